"""Run the ``pie`` command as a client of a real NDIF server (test harness, tests/test_ndif_server.py).

The one client-side adaptation the local server needs: offline, nnsight cannot canonicalise a model
id through the Hub, so the id is seeded as its own canonical form (test harness only, never in
library code). Usage: ``python tests/ndif_client.py MODEL_ID pie-args...``.
"""

import runpy
import sys

import nnsight.modeling.huggingface as nnsight_hf

if __name__ == "__main__":
    model_id = sys.argv[1]
    nnsight_hf._ID_CACHE[model_id] = model_id
    sys.argv = ["pie", *sys.argv[2:]]
    runpy.run_module("pie_lib", run_name="__main__")
