"""`python -m pkt.locate MODEL_DIR EXAMPLE_JSON --n_layers N --ffn_k K --attn_k K --out OUT.json`

Locate the layers and neurons of one model on one example and write them in the reference's
selection format; or `--prompt` and `--response` instead of EXAMPLE_JSON. Logic in pkt/attribution.py
(`locate_example`); see docs/attribution.md.
"""
from pkt.attribution import LocateConfig, locate_example
from pkt.io import run_cli

if __name__ == "__main__":
    run_cli(locate_example, LocateConfig)
