"""Execution-plan search: a cost model, a simulator driven by the real master, and a search over
device meshes and layouts for every MFC. See docs/search.md; `python -m realflow.search`."""
