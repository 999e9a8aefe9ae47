"""The parts of scripts/compare.py: loading runs, their curves, the tables and the figure."""
