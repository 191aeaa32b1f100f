"""The paper reproduction at small scale: `driver.py` runs the variants, `report.py` writes docs/RESULTS.md."""
