"""Storage: the SQLModel records, the engine/session factory, claims and migrations."""
