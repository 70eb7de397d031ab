"""``ENGINE = "django_dbkeepalive.backends.postgresql"``: Django's PostgreSQL backend,
guarded."""
