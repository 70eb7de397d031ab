"""Placeholder: the benchmarks are being written."""

if __name__ == "__main__":
    print("benchmarks coming")
