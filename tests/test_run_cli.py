"""The run command's input forms and its JSON output."""

from __future__ import annotations

import json

from conftest import PROMPTS, run_dist


def test_input_forms_agree(tiny_engine_tp2, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_engine_tp2)
    plain, jsonl = tmp_path / "p.txt", tmp_path / "p.jsonl"
    plain.write_text("\n".join(PROMPTS[:2]) + "\n")
    jsonl.write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS[:2]) + "\n")
    ids = [",".join(map(str, tok(p)["input_ids"])) for p in PROMPTS[:2]]
    results = []
    for i, src in enumerate((["--input_text", *PROMPTS[:2]], ["--input_file", str(plain)],
                             ["--input_file", str(jsonl)], ["--input_ids", *ids])):
        out = tmp_path / f"out{i}.json"
        run_dist(2, ["--engine_dir", tiny_engine_tp2, *src, "--max_new_tokens", "6", "--output_json", str(out)])
        results.append(json.loads(out.read_text()))
    tokens = [[o["output_token_ids"] for o in r] for r in results]
    assert tokens[0] == tokens[1] == tokens[2] == tokens[3]
    assert set(results[0][0]) == {"input_text", "output_text", "output_token_ids", "finish_reason"}
    assert [o["input_text"] for o in results[0]] == PROMPTS[:2]
    assert results[0][0]["output_text"] == tok.decode(tokens[0][0], skip_special_tokens=True)


def test_sampling_is_seeded(tiny_engine_tp2, tmp_path):
    args = ["--engine_dir", tiny_engine_tp2, "--input_text", PROMPTS[0], "--max_new_tokens", "8",
            "--temperature", "1.0", "--top_k", "20", "--top_p", "0.9", "--seed", "7", "--output_json"]
    outs = []
    for i in range(2):
        path = tmp_path / f"s{i}.json"
        run_dist(2, [*args, str(path)])
        outs.append(json.loads(path.read_text())[0]["output_token_ids"])
    assert outs[0] == outs[1] and len(outs[0]) == 8


def test_logit_bias_and_stop_token_ids_flags(tiny_engine_tp2, tmp_path):
    """A bias of 100 makes token 17 the first output; as a stop token it then ends the request there."""
    path = tmp_path / "o.json"
    run_dist(2, ["--engine_dir", tiny_engine_tp2, "--input_text", PROMPTS[0], "--max_new_tokens", "8",
                 "--end_id", "-1", "--logit_bias", '{"17": 100}', "--stop_token_ids", "17", "--output_json", str(path)])
    out = json.loads(path.read_text())[0]
    assert out["output_token_ids"] == [17] and out["finish_reason"] == "stop"
