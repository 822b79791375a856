"""Data, not code: this folder is installed as the package ``selfextend_local.models`` so that
``registry.json`` ships inside the wheel (see pyproject.toml). Downloaded models do not live here."""
