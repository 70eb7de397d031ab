"""Database backends with the connection guard built in, for projects that forbid
patching Django's classes.

Use one as the alias's ``ENGINE`` and set ``DBKEEPALIVE = {"PATCH": False}``::

    DATABASES = {"default": {"ENGINE": "django_dbkeepalive.backends.mysql", ...}}
    DBKEEPALIVE = {"PATCH": False}

Each is Django's own backend with :class:`~django_dbkeepalive.backends.mixin.KeepaliveWrapperMixin`
first in its bases; a backend of your own (or a third-party one, such as
django-prometheus's) gets the same guarantees with the mixin. ``"django_dbkeepalive"``
stays in ``INSTALLED_APPS``: it validates the settings, registers the checks and handles
forks. With ``PATCH`` left on (the default), these backends behave exactly like Django's
and the patched classes guard them, as every other alias.
"""
