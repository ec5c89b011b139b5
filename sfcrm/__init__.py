"""sfcrm: Sound Fusion's M-Pesa collections and event crew CRM, from the command line."""

__version__ = "0.1.0"
