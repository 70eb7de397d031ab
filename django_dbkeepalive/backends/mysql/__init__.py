"""``ENGINE = "django_dbkeepalive.backends.mysql"``: Django's MySQL backend, guarded."""
