"""A bounded soak run against real faults: ``make soak`` (``python -m soak.run``)."""
