"""sfcrm's schema upgrades, run by Alembic (see :mod:`sfcrm.db`); shipped in the wheel."""
