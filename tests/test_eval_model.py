"""The harness on tiny models: every character of a completion survives decoding (Llama-style and byte-level
tokenizers), batching and stop strings are exact, flags are checked before anything loads, outputs replace
nothing."""
import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pkt.eval import humaneval, mmlu
from pkt.eval.generate import (MIN_SHARED_PREFIX, StopOnStrings, continuations, generate_hf, next_token_logits,
                                shared_prefix_len, truncate_at_stop)
from pkt.eval.harness import EvalConfig, evaluate
from pkt.eval.nll import response_nll
from pkt.io import PKTError, config_from_flags
from pkt.testing import make_llama, make_llama_tokenizer, make_tokenizer

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "eval"


@pytest.fixture(scope="module")
def tiny(student_dir, tokenizer):
    from pkt.io import load_model, load_tokenizer

    return load_model(student_dir, device="cpu"), load_tokenizer(student_dir)


@pytest.fixture(scope="module")
def problems():
    return humaneval.load(DATA)


@pytest.fixture(scope="module")
def llama_tok(problems):
    """A Llama-2-style tokenizer whose pieces were learnt on HumanEval (realistic token counts)."""
    tok = make_llama_tokenizer(vocab_size=2000, corpus=[p["prompt"] + p["canonical_solution"] for p in problems])
    tok.pad_token = tok.eos_token
    return tok


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def test_cli_every_task_end_to_end(student_dir, chat_jsonl, tmp_path):
    data = chat_jsonl("heldout.jsonl", n=4)
    out = tmp_path / "eval"
    r = _run("--model_path", student_dir, "--tasks", "gsm,mmlu,humaneval,mbpp,nll", "--limit", "2",
             "--max_new_tokens", "8", "--n", "2", "--batch_size", "4", "--nll_data", f"toy={data}",
             "--output_dir", out)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["tasks"]) == ["gsm", "mmlu", "humaneval", "mbpp", "nll"]
    assert summary["protocol"] == "open-instruct" and summary["knobs"]["limit"] == 2
    for task, key in [("gsm", "accuracy"), ("mmlu", "accuracy"), ("humaneval", "pass@1"), ("mbpp", "pass@1")]:
        assert 0.0 <= summary["tasks"][task][key] <= 1.0
        preds = [json.loads(line) for line in (out / task / "predictions.jsonl").read_text().splitlines()]
        assert len(preds) == (4 if task in ("humaneval", "mbpp") else 2)  # n=2 samples per code problem
        assert {"prompt", "output", "correct"} <= set(preds[0])
        metrics = json.loads((out / task / "metrics.json").read_text())
        assert metrics[key] == summary["tasks"][task][key] and metrics["protocol"] == "open-instruct"
    assert summary["tasks"]["gsm"]["settings"]["shots"] == 8 and summary["tasks"]["mmlu"]["settings"]["shots"] == 5
    assert summary["tasks"]["mbpp"]["settings"]["timeout"] == 10.0 and summary["tasks"]["humaneval"]["settings"]["top_p"] == 0.95
    assert summary["tasks"]["nll"]["nll"] > 0 and "toy" in summary["tasks"]["nll"]["datasets"]
    assert "| humaneval | pass@1 |" in (out / "summary.md").read_text()


def test_paper_protocol_is_zero_shot(student_dir, tmp_path):
    cfg = EvalConfig(model_path=student_dir, tasks="gsm,mmlu", protocol="paper", output_dir=str(tmp_path / "o"))
    assert (cfg.gsm_shots, cfg.mmlu_shots) == (0, 0)
    assert EvalConfig(model_path=student_dir, protocol="paper", gsm_shots=8).gsm_shots == 8
    assert (EvalConfig(model_path=student_dir).gsm_shots, EvalConfig(model_path=student_dir).mmlu_shots) == (8, 5)


@pytest.mark.parametrize("flag, value", [
    ("timeout", 0.0), ("timeout", -1.0), ("timeout", float("nan")), ("timeout", float("inf")), ("limit", 0),
    ("gsm_limit", -5), ("mmlu_per_subject", 0), ("temperature", -1.0), ("temperature", float("nan")),
    ("top_p", 0.0), ("top_p", 2.0), ("n", 0), ("batch_size", 0), ("max_new_tokens", 0), ("gsm_shots", 3),
    ("mmlu_shots", 1), ("protocol", "tulu"), ("limit_mode", "last"), ("sandbox", "maybe"), ("backend", "tgi"),
    ("device", "gpu0"), ("dtype", "fp8"), ("tasks", "gsm,squad"), ("limit", "abc"), ("tensor_parallel_size", 0),
    ("tensor_parallel_size", 2)])   # 2 without --backend vllm
def test_bad_flags_are_refused_naming_the_flag(flag, value):
    with pytest.raises(PKTError, match=f"--{flag}"):
        config_from_flags(EvalConfig, {"model_path": "m", flag: value})


def test_cli_bad_flag_exits_2_before_loading_and_writes_nothing(tmp_path):
    r = _run("--model_path", tmp_path / "no_model_here", "--timeout", "-1", "--output_dir", tmp_path / "out")
    assert r.returncode == 2 and r.stderr.strip() == "error: --timeout -1.0: expected a number > 0"
    assert not (tmp_path / "out").exists()
    with pytest.raises(PKTError, match="--nll_data"):
        EvalConfig(model_path="m", tasks="nll")
    with pytest.raises(PKTError, match="--model_path"):
        evaluate(EvalConfig(model_path=str(tmp_path / "nope"), tasks="gsm", output_dir=str(tmp_path / "o")))


def test_sandbox_require_without_bwrap_is_refused_before_loading(student_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))                       # no bwrap to be found
    cfg = EvalConfig(model_path=student_dir, tasks="gsm,mbpp", sandbox="require", output_dir=str(tmp_path / "o"))
    with pytest.raises(PKTError, match="--sandbox require"):
        evaluate(cfg)
    assert not (tmp_path / "o").exists()


def test_output_dir_is_refused_when_it_holds_results(student_dir, chat_jsonl, tmp_path):
    data = chat_jsonl("out.jsonl", n=2)
    cfg = dict(model_path=student_dir, tasks="nll", nll_data=data, output_dir=str(tmp_path / "o"))
    evaluate(EvalConfig(**cfg))
    before = (tmp_path / "o" / "summary.json").read_text()
    with pytest.raises(PKTError, match="--output_dir .*--overwrite True"):
        evaluate(EvalConfig(**cfg))
    assert (tmp_path / "o" / "summary.json").read_text() == before
    evaluate(EvalConfig(**cfg, overwrite=True))
    with pytest.raises(PKTError, match="inside the input --model_path"):
        evaluate(EvalConfig(**{**cfg, "output_dir": str(Path(student_dir) / "eval")}))


def test_continuation_keeps_the_first_space_of_a_llama_completion(llama_tok):
    prompt = llama_tok("def f(x):\n")["input_ids"]
    new = llama_tok("def f(x):\n    return x")["input_ids"][len(prompt):]
    assert llama_tok.decode(new, skip_special_tokens=True) == "   return x"   # the decoder's stripped space
    assert continuations(llama_tok, [prompt], [new]) == ["    return x"]
    assert continuations(llama_tok, [prompt], [new + [llama_tok.eos_token_id, 5, 6]]) == ["    return x"]


def _replay_model(sequences: list[list[int]], starts: list[int], vocab: int, eos: int, window: int = 64):
    """A causal LM that transformers' generate drives and that continues each sequence's prefix
    `sequences[k][:starts[k]]` with the rest of it: the next token is looked up from the last `window` tokens
    (EOS when unknown). No cache; a PreTrainedModel so that `generate` takes it as it takes any model."""
    from transformers import GenerationMixin, LlamaConfig, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutputWithPast

    table = {}
    for seq, start in zip(sequences, starts):
        for j in range(start, len(seq)):
            assert table.setdefault(tuple(seq[max(0, j - window):j]), seq[j]) == seq[j], "window too short"

    class Replay(PreTrainedModel, GenerationMixin):
        config_class = LlamaConfig

        def __init__(self, config):
            super().__init__(config)
            self.anchor = torch.nn.Parameter(torch.zeros(1))     # a device for the harness to read
            self.post_init()

        def forward(self, input_ids, attention_mask=None, **kwargs):
            rows = input_ids.tolist()
            masks = attention_mask.tolist() if attention_mask is not None else [[1] * len(r) for r in rows]
            logits = torch.full((len(rows), 1, vocab), -1e4)
            for i, (r, m) in enumerate(zip(rows, masks)):
                logits[i, 0, table.get(tuple(t for t, keep in zip(r, m) if keep)[-window:], eos)] = 0.0
            return CausalLMOutputWithPast(logits=logits)

    model = Replay(LlamaConfig(vocab_size=vocab, eos_token_id=eos, pad_token_id=eos, use_cache=False)).eval()
    model.generation_config.use_cache = False
    return model


def _replay_of(tok, prompt: str, completion: str) -> tuple[list[int], int]:
    """Prompt ids + the ids that continue them into prompt + completion (+ EOS), and where the prompt ends."""
    p = tok(prompt)["input_ids"]
    full = tok(prompt + completion)["input_ids"]
    cont = full[len(p):] if full[:len(p)] == p else tok(completion, add_special_tokens=False)["input_ids"]
    assert continuations(tok, [p], [cont]) == [completion]
    return p + cont + [tok.eos_token_id], len(p)


def test_replayed_canonical_solutions_come_back_exactly_with_a_llama_tokenizer(problems, llama_tok):
    seqs = [_replay_of(llama_tok, p["prompt"], p["canonical_solution"]) for p in problems]
    model = _replay_model([s for s, _ in seqs], [n for _, n in seqs], len(llama_tok), llama_tok.eos_token_id)
    outs = generate_hf(model, llama_tok, [p["prompt"] for p in problems], max_new_tokens=400, batch_size=16,
                       stop=humaneval.STOP, prefix_cache=False)
    assert [o[0] for o in outs] == [p["canonical_solution"] for p in problems]
    naive = [llama_tok.decode(s[n:], skip_special_tokens=True) for s, n in seqs]
    assert sum(a == p["canonical_solution"] for a, p in zip(naive, problems)) <= 1    # what decoding alone gave
    cfg = EvalConfig(model_path="m")
    _, m = humaneval.score([humaneval.item(p) for p in problems[:12]], outs[:12], cfg)
    assert m["pass@1"] == 1.0


def test_stop_criterion_reads_the_first_space(llama_tok):
    prompt, text = "def f(x):\n", "    return x\n# done"
    seq, n = _replay_of(llama_tok, prompt, text)
    model = _replay_model([seq], [n], len(llama_tok), llama_tok.eos_token_id)
    crit = StopOnStrings(llama_tok, ["    return"], prompt_len=n)
    first_tokens = torch.tensor([seq[:n + 4]])
    assert bool(crit(first_tokens)[0])          # "    return" is there from the first new tokens on
    assert generate_hf(model, llama_tok, [prompt], max_new_tokens=20, stop=["\n#"]) == [["    return x"]]


def _memorise(tok, prompt: str, completion: str, steps: int = 300):
    """A tiny Llama trained until greedy decoding replays `completion` after `prompt` (a few dozen steps;
    one thread: for a model this small more threads only wait on each other)."""
    seq, n = _replay_of(tok, prompt, completion)
    model = make_llama(hidden=64, ffn=128, layers=2, heads=4, vocab=len(tok), seed=0).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ids = torch.tensor([seq])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            out = model(input_ids=ids, labels=ids)
            if bool((out.logits[0, n - 1:-1].argmax(-1) == ids[0, n:]).all()):
                return model.eval()
            opt.zero_grad()
            out.loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    raise AssertionError("the tiny model did not memorise the solution")


@pytest.mark.parametrize("kind", ["llama", "byte-level"])
def test_memorised_humaneval_solution_scores_pass1_through_evaluate_py(kind, problems, tmp_path):
    p = [q for q in problems if q["task_id"] == "HumanEval/53"][0]
    text = [p["prompt"] + p["canonical_solution"]]
    tok = make_llama_tokenizer(vocab_size=400, corpus=text) if kind == "llama" else make_tokenizer(corpus=text)
    tok.pad_token = tok.eos_token
    model = _memorise(tok, p["prompt"], p["canonical_solution"])
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "data" / "humaneval").mkdir(parents=True)
    with gzip.open(tmp_path / "data" / "humaneval" / "HumanEval.jsonl.gz", "wt") as f:
        f.write(json.dumps(p) + "\n")
    r = _run("--model_path", tmp_path / "model", "--tasks", "humaneval", "--data_dir", tmp_path / "data",
             "--n", "2", "--temperature", "0", "--max_new_tokens", "64", "--output_dir", tmp_path / "out")
    assert r.returncode == 0, r.stderr[-2000:]
    pred = json.loads((tmp_path / "out" / "humaneval" / "predictions.jsonl").read_text().splitlines()[0])
    assert pred["completion"] == p["canonical_solution"]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["tasks"]["humaneval"]["pass@1"] == 1.0


def test_batched_greedy_equals_unbatched(tiny):
    model, tok = tiny
    prompts = ["Question: 1 + 2 =", "def f(x): return x", "A", "Answer: the answer is 42. Question: 7 * 6 ="]
    one = generate_hf(model, tok, prompts, max_new_tokens=12, batch_size=1)
    many = generate_hf(model, tok, prompts, max_new_tokens=12, batch_size=4)
    assert one == many and all(len(o) == 1 for o in one)


@pytest.mark.parametrize("kind", ["byte-level", "llama"])
def test_shared_prefix_is_prefilled_once_and_changes_nothing(kind, tiny):
    model, tok = tiny
    if kind == "llama":
        tok = make_llama_tokenizer()
        tok.pad_token = tok.eos_token
        model = make_llama(hidden=64, ffn=160, layers=3, heads=4, vocab=len(tok), seed=2)
    shots = "Question: the cat sat on the mat. Answer: yes it did.\n\n" * 6     # few-shot exemplars
    prompts = [shots + f"Question: what {w} the dog? Answer:" for w in ("is", "was the big", "and", "has seen")]
    rows = tok(prompts)["input_ids"]
    assert shared_prefix_len(rows) >= MIN_SHARED_PREFIX
    plain = generate_hf(model, tok, prompts, max_new_tokens=12, batch_size=1, prefix_cache=False)
    cached = generate_hf(model, tok, prompts, max_new_tokens=12, batch_size=3, prefix_cache=True)
    assert cached == plain
    assert shared_prefix_len([[1, 2, 3], [1, 2, 3]]) == 2      # each row keeps a token to feed
    assert shared_prefix_len([[1, 2, 3], [1, 5], [1, 2]]) == 1


def test_stop_strings_cut_generation(tiny):
    model, tok = tiny
    prompts = ["Question: 3 + 4 =", "def g(y):"]
    free = generate_hf(model, tok, prompts, max_new_tokens=24, batch_size=2)
    text = free[0][0]
    assert len(text) > 6
    stop = text[3:6]  # a string the model is known to produce
    cut = generate_hf(model, tok, prompts, max_new_tokens=24, batch_size=2, stop=[stop])
    assert cut[0][0] == text[:text.index(stop)]
    assert truncate_at_stop("abc\n\ndef", ["\n\n", "z"]) == "abc"


def test_sampling_n_and_seed(tiny):
    model, tok = tiny
    torch.manual_seed(0)
    a = generate_hf(model, tok, ["Question:"], max_new_tokens=6, n=3, temperature=1.0, top_p=0.95)
    torch.manual_seed(0)
    b = generate_hf(model, tok, ["Question:"], max_new_tokens=6, n=3, temperature=1.0, top_p=0.95)
    assert len(a[0]) == 3 and a == b


def test_mmlu_choice_tokens_and_logits(tiny):
    model, tok = tiny
    ids = mmlu.choice_ids(tok)
    assert ids == [tok.encode(" " + l, add_special_tokens=False)[-1] for l in "ABCD"]
    prompts = ["Question: 1 + 1 =\nA. 1\nB. 2\nAnswer:", "Answer:"]
    batched = next_token_logits(model, tok, prompts, ids, batch_size=2)
    for i, p in enumerate(prompts):
        enc = tok(p, return_tensors="pt")
        ref = model(**enc).logits[0, -1, ids]
        assert torch.allclose(batched[i], ref, atol=1e-4)


def test_nll_matches_direct_computation(tiny, chat_jsonl):
    from pkt.data import load_chat_jsonl, tokenize_example

    model, tok = tiny
    recs = load_chat_jsonl(chat_jsonl("nll.jsonl", n=3))
    total, count = response_nll(model, tok, recs, batch_size=2)
    ref_total, ref_count = 0.0, 0
    for r in recs:
        f = tokenize_example(tok, r["messages"])
        ids, labels = torch.tensor([f["input_ids"]]), torch.tensor([f["labels"]])
        ref_total += torch.nn.functional.cross_entropy(model(ids).logits[0, :-1], labels[0, 1:],
                                                       ignore_index=-100, reduction="sum").item()
        ref_count += int((labels[0, 1:] != -100).sum())
    assert count == ref_count and total == pytest.approx(ref_total, rel=1e-4)


def test_adapter_path(student_dir, chat_jsonl, tmp_path):
    from peft import LoraConfig, get_peft_model

    from pkt.io import load_model

    base = load_model(student_dir, device="cpu")
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    data = chat_jsonl("adapter.jsonl", n=2)
    plain = evaluate(EvalConfig(model_path=student_dir, tasks="nll", output_dir=str(tmp_path / "a"), nll_data=data))
    adapted = evaluate(EvalConfig(model_path=student_dir, tasks="nll", output_dir=str(tmp_path / "b"), nll_data=data,
                                  adapter_path=str(tmp_path / "adapter")))
    assert adapted["adapter_path"] and adapted["tasks"]["nll"]["nll"] != plain["tasks"]["nll"]["nll"]


def test_tensor_parallel_size_reaches_the_vllm_engine(monkeypatch):
    from pkt.eval import generate

    seen = {}
    monkeypatch.setattr(generate, "vllm_available", lambda: True)
    monkeypatch.setattr(generate, "load_vllm", lambda path, seed, **kw: seen.update(kw) or object())
    cfg = EvalConfig(model_path="m", backend="vllm", tensor_parallel_size=4)
    backend = generate.load_backend(None, "m", backend=cfg.backend, needs_hf=False,
                                    tensor_parallel_size=cfg.tensor_parallel_size)
    assert seen == {"tensor_parallel_size": 4} and backend.name == "vllm"
