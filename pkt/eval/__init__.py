"""Evaluation with the Open-Instruct protocols: GSM8K, MMLU, HumanEval, MBPP, plus response NLL.

`pkt.eval.harness` holds the task registry, the protocol presets and the two entry points (`evaluate`,
`score_predictions`); each task module (`gsm`, `mmlu`, `humaneval`, `mbpp`, `nll`) has the same
build / generate / score shape; `code` is what the two code tasks share, `generate` the model side,
`sandbox` the execution of model-written programs.
"""
