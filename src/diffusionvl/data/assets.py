"""Where offline assets that ship inside installed packages live, found without importing those packages.

Contract: `package_data_path(package, *parts)` returns the path of a file inside an installed package (located with
`importlib.util.find_spec`, so importing scikit-image or matplotlib costs nothing), or None when the package is not
installed or the file is absent.
"""

from __future__ import annotations

import importlib.util
import os


def package_data_path(package: str, *parts: str) -> str | None:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = os.path.join(root, *parts)
        if os.path.isfile(path):
            return path
    return None
