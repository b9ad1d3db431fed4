"""Figure scripts used by demo.sh (matplotlib, Agg backend, PNG)."""
