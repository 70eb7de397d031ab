from django.db import models


class Item(models.Model):
    """A row the tests and the demo write, so lost or duplicated writes are visible."""

    key = models.CharField(max_length=100, unique=True)
    value = models.IntegerField(default=0)
    created = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.key}={self.value}"
