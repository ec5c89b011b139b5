"""Daraja (M-Pesa Express) over HTTP: the token, STK Push, STK Push Query, and the callback.

Every answer that is not a success becomes a :class:`~sfcrm.errors.DarajaError` subclass with the
operator hint from Safaricom's documented error codes. The client never retries an STK push on its
own: once a push may have reached Daraja, the prompt may already be on the customer's phone.
The one retry it makes is after ``404.001.03 Invalid Access Token``, which Daraja's gateway
answers before the push is processed: fetch one new token and try once more.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any, Protocol

from sfcrm.errors import (
    CallbackFormatError,
    DarajaAuthError,
    DarajaBusyError,
    DarajaCredentialsError,
    DarajaError,
    DarajaProcessingError,
    DarajaRequestError,
    DarajaTimeoutError,
    DarajaTokenError,
    DarajaUnreachableError,
)

if TYPE_CHECKING:
    import requests

# Daraja wants Nairobi wall-clock time; Kenya has no daylight saving, so a fixed offset is exact.
NAIROBI = timezone(timedelta(hours=3), "EAT")

TOKEN_PATH = "/oauth/v1/generate?grant_type=client_credentials"
PUSH_PATH = "/mpesa/stkpush/v1/processrequest"
QUERY_PATH = "/mpesa/stkpushquery/v1/query"

PAYBILL = "CustomerPayBillOnline"
BUY_GOODS = "CustomerBuyGoodsOnline"
STILL_PROCESSING = "4999"

_REFERENCE_CHARS = re.compile(r"[^A-Za-z0-9 ._-]")


def nairobi_timestamp(now: datetime) -> str:
    """``YYYYMMDDHHmmss`` in Nairobi time, whatever the host's time zone."""
    if now.tzinfo is None:
        raise ValueError("nairobi_timestamp needs an aware datetime")
    return now.astimezone(NAIROBI).strftime("%Y%m%d%H%M%S")


def stk_password(shortcode: str, passkey: str, timestamp: str) -> str:
    """``base64(shortcode + passkey + timestamp)``: the Password of a push or query."""
    return base64.b64encode(f"{shortcode}{passkey}{timestamp}".encode()).decode("ascii")


def clean_reference(text: str, limit: int, fallback: str) -> str:
    """Fit text into AccountReference/TransactionDesc: allowed characters only, cut to limit."""
    cleaned = " ".join(_REFERENCE_CHARS.sub(" ", text).split())[:limit].strip()
    return cleaned or fallback


@dataclass(frozen=True)
class PushAccepted:
    merchant_request_id: str
    checkout_request_id: str
    customer_message: str


@dataclass(frozen=True)
class QueryResult:
    """The outcome of a push as STK Push Query reports it; no receipt or amount comes back."""

    checkout_request_id: str
    result_code: str | None  # None while still processing
    result_desc: str

    @property
    def processing(self) -> bool:
        return self.result_code is None


@dataclass(frozen=True)
class StkResult:
    """An outcome of one push, from a callback (with metadata on success) or a query."""

    checkout_request_id: str
    result_code: str
    result_desc: str
    merchant_request_id: str | None = None
    amount: Decimal | None = None
    receipt_number: str | None = None
    transaction_date: datetime | None = None
    phone: str | None = None

    @property
    def paid(self) -> bool:
        return self.result_code == "0"


class TokenCache(Protocol):
    """Where tokens live between runs; each new token kills the previous one."""

    def load(self, key: str) -> tuple[str, datetime] | None: ...

    def store(self, key: str, token: str, expires_at: datetime) -> None: ...

    def lock(self) -> Any:
        """A context manager serialising token fetches across threads and processes."""
        ...


class MemoryTokenCache:
    def __init__(self) -> None:
        self._tokens: dict[str, tuple[str, datetime]] = {}
        self._lock = threading.Lock()

    def load(self, key: str) -> tuple[str, datetime] | None:
        return self._tokens.get(key)

    def store(self, key: str, token: str, expires_at: datetime) -> None:
        self._tokens[key] = (token, expires_at)

    @contextmanager
    def lock(self) -> Iterator[None]:
        with self._lock:
            yield


def token_cache_key(base_url: str, consumer_key: str) -> str:
    """Hash of (host, consumer key): the cache row never shows the key itself."""
    return hashlib.sha256(f"{base_url}\n{consumer_key}".encode()).hexdigest()


class DarajaClient:
    """A Daraja client built from its arguments; it reads no configuration itself."""

    def __init__(
        self,
        base_url: str,
        consumer_key: str,
        consumer_secret: str,
        shortcode: str,
        passkey: str,
        *,
        session: requests.Session,
        timeout: float,
        clock: Callable[[], datetime],
        token_cache: TokenCache | None = None,
        transaction_type: str = PAYBILL,
        till_number: str | None = None,
        refresh_margin: timedelta = timedelta(seconds=60),
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._consumer_key = consumer_key
        self._consumer_secret = consumer_secret
        self.shortcode = shortcode
        self._passkey = passkey
        self._session = session
        self.timeout = timeout
        self._clock = clock
        self._cache: TokenCache = token_cache or MemoryTokenCache()
        self.transaction_type = transaction_type
        self.party_b = till_number if transaction_type == BUY_GOODS and till_number else shortcode
        self._margin = refresh_margin
        self._cache_key = token_cache_key(self.base_url, consumer_key)

    def __repr__(self) -> str:
        return f"DarajaClient({self.base_url!r}, shortcode={self.shortcode!r})"

    # -- token -------------------------------------------------------------------------------

    def token(self, *, replacing: str | None = None) -> str:
        """A valid access token: the cached one, or a new one when it is near expiry.

        ``replacing`` is a token Daraja just refused; a new one is fetched unless another
        process already replaced it.
        """
        cached = self._cache.load(self._cache_key)
        if self._usable(cached, replacing):
            assert cached is not None
            return cached[0]
        with self._cache.lock():
            cached = self._cache.load(self._cache_key)
            if self._usable(cached, replacing):
                assert cached is not None
                return cached[0]
            token, lifetime = self._fetch_token()
            # Stop using a token a little before Daraja does: a minute early, or a tenth of its
            # life when that is shorter, so a short-lived token is still used many times.
            early = min(self._margin, timedelta(seconds=lifetime / 10))
            use_until = self._clock() + timedelta(seconds=lifetime) - early
            self._cache.store(self._cache_key, token, use_until)
            return token

    def _usable(self, cached: tuple[str, datetime] | None, replacing: str | None) -> bool:
        if cached is None or cached[0] == replacing:
            return False
        return cached[1] > self._clock()

    def _fetch_token(self) -> tuple[str, int]:
        basic = base64.b64encode(f"{self._consumer_key}:{self._consumer_secret}".encode()).decode()
        response = self._send("GET", TOKEN_PATH, headers={"Authorization": f"Basic {basic}"})
        if response.status_code == 400 or response.status_code == 401:
            raise DarajaAuthError(
                "Daraja refused the consumer key and secret",
                value=f"HTTP {response.status_code}",
                hint="check MPESA_CONSUMER_KEY and MPESA_CONSUMER_SECRET, and that they belong "
                "to MPESA_ENVIRONMENT (sandbox keys do not work in production)",
                http_status=response.status_code,
            )
        if response.status_code != 200:
            raise _error_from_response(response, "token request")
        doc = _json_object(response)
        token = doc.get("access_token") if doc else None
        try:
            lifetime = int(str(doc.get("expires_in", "3599"))) if doc else 0
        except ValueError:
            lifetime = 0
        if not isinstance(token, str) or not token or lifetime <= 0:
            raise DarajaError(
                "Daraja's token answer could not be read", http_status=response.status_code
            )
        return token, lifetime

    # -- STK push and query ------------------------------------------------------------------

    def stk_push(
        self,
        *,
        phone: str,
        amount: int,
        callback_url: str,
        account_reference: str,
        transaction_desc: str,
    ) -> PushAccepted:
        """Send one STK push. Raises DarajaTimeoutError when the outcome is unknown."""
        timestamp = nairobi_timestamp(self._clock())
        body = {
            "BusinessShortCode": self.shortcode,
            "Password": stk_password(self.shortcode, self._passkey, timestamp),
            "Timestamp": timestamp,
            "TransactionType": self.transaction_type,
            "Amount": amount,
            "PartyA": phone,
            "PartyB": self.party_b,
            "PhoneNumber": phone,
            "CallBackURL": callback_url,
            "AccountReference": clean_reference(account_reference, 12, "SoundFusion"),
            "TransactionDesc": clean_reference(transaction_desc, 13, "Payment"),
        }
        doc = self._call(PUSH_PATH, body, what="STK push", unknown_outcome=True)
        checkout = doc.get("CheckoutRequestID")
        if str(doc.get("ResponseCode")) != "0" or not isinstance(checkout, str) or not checkout:
            raise DarajaTimeoutError(
                "Daraja's answer to the push could not be understood",
                value=_snippet(json.dumps(doc)),
                hint="the prompt may have reached the phone: run `sfcrm mpesa reconcile` "
                "later instead of pushing again",
            )
        return PushAccepted(
            merchant_request_id=str(doc.get("MerchantRequestID") or ""),
            checkout_request_id=checkout,
            customer_message=str(doc.get("CustomerMessage") or ""),
        )

    def stk_query(self, checkout_request_id: str) -> QueryResult:
        """Ask Daraja how a push ended. Still processing is a result, not an error."""
        timestamp = nairobi_timestamp(self._clock())
        body = {
            "BusinessShortCode": self.shortcode,
            "Password": stk_password(self.shortcode, self._passkey, timestamp),
            "Timestamp": timestamp,
            "CheckoutRequestID": checkout_request_id,
        }
        try:
            doc = self._call(QUERY_PATH, body, what="STK push query", unknown_outcome=False)
        except DarajaProcessingError as exc:
            return QueryResult(checkout_request_id, None, exc.message)
        code = doc.get("ResultCode")
        desc = self._redactor()(str(doc.get("ResultDesc") or doc.get("ResponseDescription") or ""))
        if code is None or isinstance(code, bool) or str(code) == STILL_PROCESSING:
            return QueryResult(checkout_request_id, None, desc or "still processing")
        return QueryResult(checkout_request_id, str(code), desc)

    # -- transport ---------------------------------------------------------------------------

    def _call(
        self, path: str, body: dict[str, Any], *, what: str, unknown_outcome: bool
    ) -> dict[str, Any]:
        try:
            return self._call_once(path, body, what=what, unknown_outcome=unknown_outcome)
        except DarajaError as exc:
            # A gateway page or an error message may quote the request back: the Password,
            # the Basic header, the callback URL. Nothing of them may reach a log or a row.
            redact = self._redactor(body.get("CallBackURL"))
            exc.message = redact(exc.message)
            exc.value = redact(exc.value) if exc.value else exc.value
            raise

    def _redactor(self, callback_url: str | None = None) -> Callable[[str], str]:
        from urllib.parse import urlsplit

        from sfcrm.logs import Redactor

        secrets = [self._consumer_key, self._consumer_secret, self._passkey]
        if callback_url:
            secrets.append(urlsplit(callback_url).path.strip("/"))
        return Redactor(secrets)

    def _call_once(
        self, path: str, body: dict[str, Any], *, what: str, unknown_outcome: bool
    ) -> dict[str, Any]:
        token = self.token()
        response = self._post(path, body, token, unknown_outcome)
        if _error_code(response) == "404.001.03":
            token = self.token(replacing=token)
            response = self._post(path, body, token, unknown_outcome)
        if response.status_code != 200:
            error = _error_from_response(response, what)
            if unknown_outcome and response.status_code >= 500 and error.error_code is None:
                # A gateway page instead of Daraja's envelope: the push may have gone through.
                raise DarajaTimeoutError(
                    f"Daraja's gateway answered HTTP {response.status_code} to the {what}",
                    value=error.value,
                    hint="the prompt may have reached the phone: run `sfcrm mpesa reconcile` "
                    "later instead of pushing again",
                    http_status=response.status_code,
                )
            raise error
        doc = _json_object(response)
        if doc is None:
            if unknown_outcome:
                raise DarajaTimeoutError(
                    f"Daraja's answer to the {what} is not JSON",
                    value=_snippet(response.text),
                    hint="the prompt may have reached the phone: run `sfcrm mpesa reconcile` later",
                )
            raise DarajaError(
                f"Daraja's answer to the {what} is not JSON", value=_snippet(response.text)
            )
        return doc

    def _post(
        self, path: str, body: dict[str, Any], token: str, unknown_outcome: bool
    ) -> requests.Response:
        return self._send(
            "POST",
            path,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            data=json.dumps(body),
            unknown_outcome=unknown_outcome,
        )

    def _send(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str],
        data: str | None = None,
        unknown_outcome: bool = False,
    ) -> requests.Response:
        import requests

        url = self.base_url + path
        try:
            return self._session.request(
                method, url, headers=headers, data=data, timeout=self.timeout
            )
        except requests.RequestException as exc:
            raise _transport_error(exc, self.base_url, unknown_outcome) from None


def _transport_error(exc: Exception, base_url: str, unknown_outcome: bool) -> DarajaError:
    import requests

    if isinstance(exc, requests.ConnectTimeout) or _never_connected(exc):
        return DarajaUnreachableError(
            "Daraja could not be reached",
            value=base_url,
            hint="check the network and MPESA_ENVIRONMENT / MPESA_BASE_URL; nothing was sent",
        )
    if unknown_outcome:
        return DarajaTimeoutError(
            "no answer from Daraja in time; the push may have reached the phone",
            value=base_url,
            hint="do not push again: the callback or `sfcrm mpesa reconcile` will settle it",
        )
    return DarajaTimeoutError(
        "no answer from Daraja in time", value=base_url, hint="try again in a minute"
    )


def _never_connected(exc: BaseException) -> bool:
    """True when the request provably never left: DNS failure or a refused connection."""
    from urllib3.exceptions import NameResolutionError, NewConnectionError

    seen: set[int] = set()
    node: BaseException | None = exc
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        if isinstance(node, NewConnectionError | NameResolutionError | ConnectionRefusedError):
            return True
        for arg in getattr(node, "args", ()):
            if isinstance(arg, BaseException) and _never_connected(arg):
                return True
        reason = getattr(node, "reason", None)
        if isinstance(reason, BaseException) and reason is not node and _never_connected(reason):
            return True
        node = node.__cause__ or node.__context__
    return False


def _json_object(response: requests.Response) -> dict[str, Any] | None:
    try:
        doc = json.loads(response.content or b"null")
    except (ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


def _error_code(response: requests.Response) -> str | None:
    if response.status_code == 200:
        return None
    doc = _json_object(response)
    code = doc.get("errorCode") if doc else None
    return str(code) if code is not None else None


def _snippet(text: str, limit: int = 200) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit] + "…"


_FIELD_HINTS = {
    "Amount": "the amount must be whole shillings from 1 to 250,000",
    "PhoneNumber": "the phone must be 2547XXXXXXXX or 2541XXXXXXXX",
    "PartyA": "the phone must be 2547XXXXXXXX or 2541XXXXXXXX",
    "PartyB": "PartyB must be the PayBill number, or the till number for "
    "CustomerBuyGoodsOnline (MPESA_TILL_NUMBER)",
    "CallBackURL": "MPESA_CALLBACK_URL must be a public https URL without the words "
    "mpesa, safaricom, sql, query, exec or cmd",
    "Timestamp": "the clock or time zone of this machine is off",
    "BusinessShortCode": "check MPESA_BUSINESS_SHORT_CODE",
    "AccountReference": "at most 12 letters, digits, spaces or - _ .",
    "TransactionDesc": "at most 13 letters, digits, spaces or - _ .",
}


def _error_from_response(response: requests.Response, what: str) -> DarajaError:
    status = response.status_code
    doc = _json_object(response)
    code = message = request_id = None
    if doc:
        if doc.get("errorCode") is not None:
            code = str(doc["errorCode"])
            message = str(doc.get("errorMessage") or "")
            request_id = str(doc.get("requestId") or "") or None
        elif isinstance(doc.get("fault"), dict):
            fault = doc["fault"]
            message = str(fault.get("faultstring") or fault.get("detail") or fault)
    if code is None:
        body = message or _snippet(response.text) or response.reason or ""
        return DarajaError(
            f"Daraja answered HTTP {status} to the {what}",
            value=_snippet(body),
            hint="Daraja may be having trouble; try again later",
            http_status=status,
        )
    kwargs: dict[str, Any] = {
        "value": code,
        "http_status": status,
        "error_code": code,
        "request_id": request_id,
    }
    text = f"Daraja refused the {what}: {message}"
    lowered = (message or "").lower()
    if code == "404.001.03":
        return DarajaTokenError(
            text,
            hint="the token was refused even after a refresh: check that MPESA_ENVIRONMENT "
            "matches the keys and that the app has the Lipa na M-Pesa product",
            **kwargs,
        )
    if code.startswith("400."):
        field = next((name for name in _FIELD_HINTS if name.lower() in lowered), None)
        hint = _FIELD_HINTS[field] if field else "a field of the request is malformed"
        return DarajaRequestError(text, hint=hint, **kwargs)
    if code == "500.001.1001":
        if "being processed" in lowered:
            return DarajaProcessingError(text, hint="wait and ask again", **kwargs)
        if "wrong credentials" in lowered:
            return DarajaCredentialsError(
                text,
                hint="MPESA_PASS_KEY belongs to another shortcode or environment, "
                "or this machine's clock is off",
                **kwargs,
            )
        if "merchant does not exist" in lowered:
            return DarajaCredentialsError(
                text,
                hint="MPESA_BUSINESS_SHORT_CODE is not enabled in MPESA_ENVIRONMENT "
                "(sandbox and production mixed up?)",
                **kwargs,
            )
        if "lock subscriber" in lowered:
            return DarajaBusyError(
                text,
                hint="another M-Pesa prompt is open on that phone; wait a minute or two",
                **kwargs,
            )
    if code in ("500.003.02", "500.003.03"):
        return DarajaBusyError(
            text, hint="Daraja is limiting requests; back off and try later", **kwargs
        )
    if code == "500.003.1001":
        return DarajaBusyError(text, hint="Daraja had an internal error; try later", **kwargs)
    return DarajaError(text, hint="see Daraja's error code list", **kwargs)


# -- callbacks ---------------------------------------------------------------------------------

MAX_ID_LENGTH = 100


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # With a key twice, json keeps the last: "ResultCode": 1032, "ResultCode": 0 would pay.
    doc = dict(pairs)
    if len(doc) != len(pairs):
        raise ValueError("a key appears twice")
    return doc


def parse_stk_callback(body: bytes) -> StkResult:
    """Read a Daraja STK callback body; anything else raises CallbackFormatError."""
    if not body:
        raise CallbackFormatError("empty body")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise CallbackFormatError("body is not UTF-8") from None
    try:
        doc = json.loads(
            text,
            parse_float=Decimal,
            parse_constant=_reject_constant,
            object_pairs_hook=_unique_keys,
        )
    except (ValueError, RecursionError):
        raise CallbackFormatError("body is not valid JSON") from None
    stk = _dig(doc, "Body", "stkCallback")
    if not isinstance(stk, dict):
        raise CallbackFormatError("no Body.stkCallback object")
    checkout = stk.get("CheckoutRequestID")
    if not _is_id(checkout):
        raise CallbackFormatError("no valid Body.stkCallback.CheckoutRequestID")
    assert isinstance(checkout, str)
    code = stk.get("ResultCode")
    if isinstance(code, bool) or not isinstance(code, int | str) or not str(code).strip():
        raise CallbackFormatError("no valid ResultCode")
    code_text = str(code).strip()
    if len(code_text) > 32 or not code_text.isascii() or not code_text.isprintable():
        raise CallbackFormatError("ResultCode is not a short printable code")
    desc = stk.get("ResultDesc")
    merchant = stk.get("MerchantRequestID")
    metadata = stk.get("CallbackMetadata")
    if metadata is not None and not (
        isinstance(metadata, dict) and isinstance(metadata.get("Item"), list)
    ):
        raise CallbackFormatError("CallbackMetadata is not an object with an Item list")
    items = _metadata_items(metadata)
    amount = _amount(items.get("Amount"))
    if "Amount" in items and amount is None:
        # A "paid" whose amount cannot be read must not skip the amount check: refuse it,
        # the body stays stored and a query settles the payment.
        raise CallbackFormatError("the Amount item is not an amount")
    return StkResult(
        checkout_request_id=checkout,
        result_code=code_text,
        result_desc=_clean_text(desc[:500]) if isinstance(desc, str) else "",
        merchant_request_id=merchant if _is_id(merchant) else None,
        amount=amount,
        receipt_number=_short_text(items.get("MpesaReceiptNumber")),
        transaction_date=_transaction_date(items.get("TransactionDate")),
        phone=_short_text(items.get("PhoneNumber")),
    )


def _dig(doc: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(doc, dict):
            return None
        doc = doc.get(key)
    return doc


def _is_id(value: Any) -> bool:
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_ID_LENGTH
        and value.isascii()
        and value.isprintable()
        and not value.isspace()
    )


def _metadata_items(metadata: Any) -> dict[str, Any]:
    items = metadata.get("Item") if isinstance(metadata, dict) else None
    found: dict[str, Any] = {}
    if isinstance(items, list):
        for item in items:
            if isinstance(item, dict) and isinstance(item.get("Name"), str) and "Value" in item:
                found.setdefault(item["Name"], item["Value"])
    return found


def _amount(value: Any) -> Decimal | None:
    if isinstance(value, bool) or not isinstance(value, int | Decimal | str):
        return None
    try:
        amount = Decimal(str(value).strip())
    except InvalidOperation:
        return None
    return amount if amount.is_finite() and amount.copy_abs() < 10**12 else None


def _short_text(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | str):
        return None
    text = str(value).strip()
    return text if 0 < len(text) <= 40 and text.isprintable() else None


def _clean_text(text: str) -> str:
    # Lone surrogates from "\ud800" escapes cannot be stored as UTF-8.
    return text.encode("utf-8", "replace").decode("utf-8")


def _transaction_date(value: Any) -> datetime | None:
    text = _short_text(value)
    if text is None or len(text) != 14 or not (text.isascii() and text.isdigit()):
        return None
    if not "2000" <= text[:4] <= "2999":
        return None
    try:  # fourteen digits: read directly, strptime costs a burst of callbacks real time
        return datetime(
            int(text[:4]), int(text[4:6]), int(text[6:8]),
            int(text[8:10]), int(text[10:12]), int(text[12:14]), tzinfo=NAIROBI,
        )  # fmt: skip
    except ValueError:  # month 13, 30 February, hour 24 ...
        return None
