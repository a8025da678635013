"""transformers' lazy names resolve in a thread while the engine's warm import runs.

A fresh interpreter starts the warm import (as ``Engine.__aenter__`` does on its executor) and,
while it runs, another thread resolves the names the describe and tokenizer paths need. Before
``hfimport`` the second thread got ``AttributeError: module 'transformers' has no attribute
'PreTrainedTokenizerFast'`` (3 of 3 runs) and the pad-token probe answered None, i.e. a
scale-from-zero request failed with a 500 or ran unpadded.
"""

from __future__ import annotations

import json
import subprocess
import sys

_SCRIPT = r"""
import json, threading, time
from cicada_async.engine import hfimport, modeldir
from cicada_async.engine.forward import pad_token
from cicada_async.engine.modeldir import ModelSpec

spec = ModelSpec(kind="transformers", architecture="BertForQuestionAnswering",
                 config={"pad_token_id": 0, "model_type": "bert"}, weight_files=[])
out = {}
warm = threading.Thread(target=modeldir.import_model_libraries)
warm.start()
time.sleep(0.3)  # the import (seconds) is under way
out["pad"] = pad_token(spec)
try:
    out["fast"] = isinstance(hfimport.attr("PreTrainedTokenizerFast"), type)
except AttributeError as e:
    out["fast"] = repr(e)
out["warm_still_running_when_asked"] = True
warm.join()
print(json.dumps(out))
"""


def test_names_resolve_while_the_warm_import_runs() -> None:
    r = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["fast"] is True, out["fast"]
    assert out["pad"] == 0  # BertForQuestionAnswering takes attention_mask: padding allowed
