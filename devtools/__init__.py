"""Support for the tests, the benchmarks and the docs scripts, never imported by the app: the
production server on a free port with a headless browser (devserver.py), and crafted hostile
files (hostile_files.py)."""
