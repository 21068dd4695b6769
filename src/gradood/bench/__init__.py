"""Benchmarks: a spec (TOML) -> runs -> results tables (CSV/JSON/Markdown) -> an offline HTML report with plots.

``report.write_report`` / ``report.write_tables`` turn per-(model, ID set, OOD set, detector) result rows
into the report folder; ``plots`` renders its figures (matplotlib, Agg, no pyplot state).
"""
