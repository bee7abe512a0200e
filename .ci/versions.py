"""Print the resolved versions of the packages the test run depends on most (CI's header)."""

from importlib import metadata

PACKAGES = ("torch", "triton", "transformers", "sentence-transformers", "open_clip_torch", "kernels",
            "numpy", "hypothesis", "pytest")


def versions():
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


if __name__ == "__main__":
    print("== resolved versions ==")
    for name, version in versions().items():
        print(f"{name:24s} {version}")
