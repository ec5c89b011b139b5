"""The schema upgrades sfcrm ran before Alembic took them over (``PRAGMA user_version`` 1 to 4),
exactly as those releases shipped them. The tests build files of the older releases with them;
sfcrm itself upgrades such files through its Alembic revisions (``sfcrm/migrations``)."""

MIGRATIONS: tuple[str, ...] = (
    # 1: people, payments, their pushes, the callback inbox and the token cache
    """
    CREATE TABLE person (
        id INTEGER NOT NULL PRIMARY KEY,
        name VARCHAR NOT NULL,
        phone VARCHAR NOT NULL UNIQUE,
        email VARCHAR UNIQUE,
        balance_cents INTEGER NOT NULL,
        created_at DATETIME NOT NULL
    );
    CREATE TABLE mpesa_payment (
        id INTEGER NOT NULL PRIMARY KEY,
        person_id INTEGER NOT NULL REFERENCES person (id),
        phone_number VARCHAR NOT NULL,
        amount INTEGER NOT NULL,
        payment_purpose VARCHAR NOT NULL,
        account_reference VARCHAR,
        status VARCHAR NOT NULL,
        checkout_request_id VARCHAR UNIQUE,
        merchant_request_id VARCHAR,
        result_code VARCHAR,
        result_desc VARCHAR,
        receipt_number VARCHAR,
        transaction_date DATETIME,
        initiated_at DATETIME NOT NULL,
        completed_at DATETIME,
        last_pushed_at DATETIME,
        push_count INTEGER NOT NULL,
        balance_applied BOOLEAN NOT NULL,
        refund_due BOOLEAN NOT NULL,
        resend_claimed_until DATETIME
    );
    CREATE INDEX ix_mpesa_payment_person_status ON mpesa_payment (person_id, status);
    CREATE INDEX ix_mpesa_payment_status ON mpesa_payment (status);
    CREATE TABLE mpesa_checkout (
        id INTEGER NOT NULL PRIMARY KEY,
        payment_id INTEGER NOT NULL REFERENCES mpesa_payment (id),
        checkout_request_id VARCHAR NOT NULL UNIQUE,
        merchant_request_id VARCHAR,
        pushed_at DATETIME NOT NULL,
        result_code VARCHAR,
        result_desc VARCHAR,
        result_source VARCHAR,
        result_at DATETIME,
        receipt_number VARCHAR,
        paid_amount VARCHAR
    );
    CREATE INDEX ix_mpesa_checkout_payment_id ON mpesa_checkout (payment_id);
    CREATE TABLE mpesa_callback (
        id INTEGER NOT NULL PRIMARY KEY,
        received_at DATETIME NOT NULL,
        source_addr VARCHAR,
        body BLOB NOT NULL,
        checkout_request_id VARCHAR,
        result_code VARCHAR,
        trusted BOOLEAN NOT NULL,
        outcome VARCHAR NOT NULL,
        detail VARCHAR,
        payment_id INTEGER REFERENCES mpesa_payment (id),
        processed_at DATETIME
    );
    CREATE INDEX ix_mpesa_callback_checkout_request_id ON mpesa_callback (checkout_request_id);
    CREATE INDEX ix_mpesa_callback_outcome ON mpesa_callback (outcome);
    CREATE TABLE daraja_token (
        cache_key VARCHAR NOT NULL PRIMARY KEY,
        access_token VARCHAR NOT NULL,
        expires_at DATETIME NOT NULL,
        fetched_at DATETIME NOT NULL
    );
    """,
    # 2: events, crew assignments and the mail log
    """
    CREATE TABLE event (
        id INTEGER NOT NULL PRIMARY KEY,
        name VARCHAR NOT NULL,
        date VARCHAR NOT NULL,
        time VARCHAR,
        end_time VARCHAR,
        location VARCHAR NOT NULL,
        details VARCHAR,
        starts_at DATETIME NOT NULL,
        ends_at DATETIME NOT NULL,
        created_at DATETIME NOT NULL
    );
    CREATE INDEX ix_event_starts_at ON event (starts_at);
    CREATE TABLE email_notification (
        id INTEGER NOT NULL PRIMARY KEY,
        recipient VARCHAR NOT NULL,
        person_id INTEGER REFERENCES person (id),
        assignment_id INTEGER REFERENCES event_crew (id),
        notification_type VARCHAR NOT NULL,
        subject VARCHAR NOT NULL,
        message VARCHAR NOT NULL,
        mime BLOB NOT NULL,
        created_at DATETIME NOT NULL,
        is_sent BOOLEAN NOT NULL,
        sent_at DATETIME,
        failed_attempts INTEGER NOT NULL,
        last_error VARCHAR,
        permanent_failure BOOLEAN NOT NULL,
        claimed_until DATETIME,
        claim_token VARCHAR
    );
    CREATE INDEX ix_email_notification_person_id ON email_notification (person_id);
    CREATE INDEX ix_email_notification_notification_type ON email_notification (notification_type);
    CREATE INDEX ix_email_notification_created_at ON email_notification (created_at);
    CREATE INDEX ix_email_notification_is_sent ON email_notification (is_sent);
    CREATE TABLE event_crew (
        id INTEGER NOT NULL PRIMARY KEY,
        event_id INTEGER NOT NULL REFERENCES event (id),
        person_id INTEGER NOT NULL REFERENCES person (id),
        role VARCHAR NOT NULL,
        status VARCHAR NOT NULL,
        notes VARCHAR,
        invitation_sent BOOLEAN NOT NULL,
        invitation_sent_at DATETIME,
        invitation_email_id INTEGER REFERENCES email_notification (id),
        reminder_sent BOOLEAN NOT NULL,
        reminder_sent_at DATETIME,
        reminder_email_id INTEGER REFERENCES email_notification (id),
        responded_at DATETIME,
        created_at DATETIME NOT NULL
    );
    CREATE UNIQUE INDEX ux_event_crew_event_person ON event_crew (event_id, person_id);
    CREATE INDEX ix_event_crew_event_status ON event_crew (event_id, status);
    CREATE INDEX ix_event_crew_person_status ON event_crew (person_id, status);
    """,
    # 3: the balance ledger; balances held before it become opening entries
    """
    CREATE TABLE balance_entry (
        id INTEGER NOT NULL PRIMARY KEY,
        person_id INTEGER NOT NULL REFERENCES person (id),
        amount_cents INTEGER NOT NULL,
        balance_after_cents INTEGER NOT NULL,
        kind VARCHAR NOT NULL,
        reason VARCHAR,
        payment_id INTEGER REFERENCES mpesa_payment (id),
        created_at DATETIME NOT NULL
    );
    CREATE INDEX ix_balance_entry_person_id ON balance_entry (person_id);
    CREATE UNIQUE INDEX ux_balance_entry_payment ON balance_entry (payment_id)
        WHERE payment_id IS NOT NULL;
    INSERT INTO balance_entry (person_id, amount_cents, balance_after_cents, kind, reason,
                               created_at)
        SELECT id, balance_cents, balance_cents, 'opening', 'balance before the ledger',
               strftime('%Y-%m-%d %H:%M:%S', 'now')
        FROM person WHERE balance_cents != 0;
    """,
    # 4: a payment left "initiated" by an older release may have been pushed (that release
    # recorded the push only once Daraja answered): its outcome is unknown, not "never sent";
    # pushes are found by when they were sent (a "paid" callback no push holds)
    """
    UPDATE mpesa_payment
        SET status = 'unknown',
            last_pushed_at = COALESCE(last_pushed_at, initiated_at),
            result_desc = COALESCE(result_desc, 'left initiated by an older sfcrm: the push '
                                                || 'may have been sent')
        WHERE status = 'initiated';
    CREATE INDEX ix_mpesa_payment_last_pushed_at ON mpesa_payment (last_pushed_at);
    """,
)
