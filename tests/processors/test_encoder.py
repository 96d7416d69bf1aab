from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from processors.encoder import Encoder, available_cores

ITALIAN = (
    "Il Bundestag ha approvato il mandato per la sorveglianza aerea sopra l'Ucraina "
    "occidentale nell'ambito della forza di rassicurazione della coalizione."
)
ENGLISH = "Turkey offers to lead the coalition's Black Sea demining mission after a ceasefire."


@pytest.fixture(scope="module")
def encoder(e5_dir: Path) -> Encoder:
    return Encoder.load(e5_dir, encoder_id="multilingual-e5-small", batch_size=4)


def test_vectors_are_normalized_and_batching_does_not_change_them(encoder: Encoder) -> None:
    texts = [ITALIAN, ENGLISH, ITALIAN * 12, "Breve.", ENGLISH * 3, ITALIAN + " " + ENGLISH]
    together = encoder.encode(texts)
    alone = np.stack([encoder.encode([t])[0] for t in texts])
    assert together.shape == (len(texts), 384) and together.dtype == np.float32
    assert np.allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    # Sorting by length and padding into mini-batches gives the same vectors as one by one.
    assert np.allclose(together, alone, atol=2e-4)


def test_long_texts_are_split_into_512_token_windows(encoder: Encoder) -> None:
    long = " ".join([ITALIAN] * 60)
    windows = encoder._windows([long])
    assert len(windows) > 2
    assert all(len(w.ids) <= 512 for w in windows)
    assert windows[0].ids[0] == encoder.tokenizer.cls_token_id
    assert windows[-1].ids[-1] == encoder.tokenizer.sep_token_id
    # The whole text is covered once: content tokens across windows add up to the text's.
    content = len(encoder.tokenizer("query: " + long, add_special_tokens=False)["input_ids"])
    assert sum(w.weight for w in windows) == content
    # A long text about one thing stays close to its first paragraph.
    assert float(encoder.encode([long])[0] @ encoder.encode([ITALIAN])[0]) > 0.9


def test_empty_input_gives_an_empty_matrix(encoder: Encoder) -> None:
    assert encoder.encode([]).shape == (0, 384)


def test_threads_match_the_cores(encoder: Encoder) -> None:
    import torch

    assert torch.get_num_threads() == available_cores()


def test_offline_loading_refuses_an_unknown_hub_id() -> None:
    with pytest.raises(OSError, match="no-such-org/no-such-model"):
        Encoder.load("no-such-org/no-such-model", offline=True)
