"""Experiment suites and their report (``s2moe experiment``, ``s2moe report``).

    suite.py    the typed suite file: Suite / EvalSpec / Variant / Claim, and each run's RunSpec
    runner.py   train, evaluate and analyse every (variant, seed), resumably, sharded over workers
    results.py  Result (a run's result.json), the code fingerprint, the tables, suite.json (locked)
    tables.py   the results table (mean ± std over seeds) as Markdown
    stats.py    paired gaps over seeds and their Student-t intervals (scipy), verdicts
    claims.py   the statements the suite's ``claims:`` ask for, one function per kind
    plots.py    the report's figures
    report.py   the report: docs/results.md and its plots

tables, stats, claims, plots and report read finished runs and cannot change their numbers: they are
left out of the code fingerprint (``results.NOT_NUMERIC``), so editing them keeps old runs tabled.
"""
