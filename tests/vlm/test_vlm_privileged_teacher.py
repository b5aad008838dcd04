"""A privileged VLM teacher reads the record's pictures and its own prompt text: its scores are the next-token
logits of an unpadded single-row forward over those pictures, teacher_prompt and the response."""

from __future__ import annotations

import json

import pytest
import torch

from mmopd.engines import DISTRIBUTION, TeacherNeed
from mmopd.run.session import Session
from modalities.vlm.adapter import TOKEN_ALIGNED

pytestmark = pytest.mark.usefixtures("one_thread")
HINT = "the shape is a red square"  # the teacher's privileged context, in the toy's words


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])  # multimodal rope, and 1-D positions
def test_privileged_vlm_teacher_scores_equal_hf_scoring_of_pictures_teacher_prompt_and_response(family, vlm_config,
                                                                                               vlm_data, tmp_path):
    base = vlm_data["train"].parent
    rows = [json.loads(line) for line in vlm_data["train"].read_text().splitlines()[:2]]
    rows = [{**r, "images": [str(base / p) for p in r["images"]], "teacher_prompt": f"{HINT} . {r['prompt']}"}
            for r in rows]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    session = Session(vlm_config(family, **{"data.train": str(tmp_path / "train.jsonl"), "objective.fused": "never"}))
    models, adapter, processor = session.models(), session.adapter, session.teacher_processor
    records = list(session.train_data.records)
    words = processor.tokenizer.convert_tokens_to_ids(["red", "square", "left", "?"])
    response = torch.tensor([words, words[::-1]])  # [B, T]
    scored = models.scorer.score(models.teacher_prompts(records), response, TeacherNeed(DISTRIBUTION)).values
    for b, record in enumerate(records):
        assert record["prompt"] == rows[b]["prompt"]  # the student's record keeps its own prompt
        single = adapter.encode_prompts([{**record, "prompt": rows[b]["teacher_prompt"]}], processor)  # no padding
        ids = torch.cat([single.input_ids, response[b:b + 1]], dim=1)
        extras = {k: torch.cat([v, v.new_zeros(1, response.shape[1])], dim=1) if k in TOKEN_ALIGNED else v
                  for k, v in single.model_inputs.items()}
        with torch.no_grad():
            expected = session.teacher(input_ids=ids, **extras).logits[0, -response.shape[1] - 1:-1]  # own positions
        torch.testing.assert_close(scored[b], session.space.restrict(expected), rtol=0, atol=1e-5)
        assert single.state["images"] and "pixel_values" in single.model_inputs  # the pictures stay
