"""vexport's tests: a regular package, so that `from tests.helpers import ...` finds this folder from the checkout
root even where an installed distribution ships its own top-level `tests` package (OpenRLHF 0.11.2 does, and
a regular package anywhere on sys.path beats a folder without __init__.py). See tests/test_checkout_imports.py."""
