"""lm-eval task files over a local held-out JSONL ({"question", "answer"}): nothing is
downloaded at run time (`dataset_path: json` is the `datasets` package's built-in JSON
loader, reading `data_files`).

Two tasks, the two request types the adapter implements:

    rlp_heldout_gen  generate_until: greedy answer until a newline, exact match on the
                     answer (GSM8K-style: the first number of the output)
    rlp_heldout_ll   loglikelihood of " <answer>" after the prompt: `acc` is lm-eval's
                     "the answer is the greedy continuation", `perplexity` exp(-log-lik)
"""

from __future__ import annotations

from pathlib import Path

_COMMON = """dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
"""

_GEN = """task: rlp_heldout_gen
{common}output_type: generate_until
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until:
    - "\\n"
  do_sample: false
  temperature: 0.0
  max_gen_toks: 16
filter_list:
  - name: "first-number"
    filter:
      - function: "regex"
        regex_pattern: "(-?[0-9][0-9,]*)"
      - function: "take_first"
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    regexes_to_ignore:
      - ","
metadata:
  version: 1.0
"""

_LL = """task: rlp_heldout_ll
{common}output_type: loglikelihood
doc_to_target: " {{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
metadata:
  version: 1.0
"""


def write_lm_eval_tasks(out_dir: str | Path, data_file: str | Path) -> list[Path]:
    """Write the two task YAMLs into `out_dir` (pass it to lm-eval as `--include_path`).

    Returns:
        The written files.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    common = _COMMON.format(data=Path(data_file).resolve())
    files = []
    for name, body in (("rlp_heldout_gen.yaml", _GEN), ("rlp_heldout_ll.yaml", _LL)):
        path = out / name
        path.write_text(body.format(common=common), encoding="utf-8")
        files.append(path)
    return files
