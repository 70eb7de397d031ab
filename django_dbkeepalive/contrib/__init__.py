"""Integrations with third-party libraries, one module each.

Nothing is imported here: each module imports its library itself, so a project only
needs the libraries of the integrations it uses (``django_dbkeepalive.contrib.apscheduler``
needs APScheduler 3.x, installed with the ``[apscheduler]`` extra).
"""
