"""Placeholder: the demo is being written."""

if __name__ == "__main__":
    print("demo coming")
