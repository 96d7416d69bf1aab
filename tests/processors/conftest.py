"""Processor fixtures: the real encoder (built once per test session) and the repo's heads."""

from __future__ import annotations

from pathlib import Path

import pytest

from processors.classifier import Classifier, ClassifierOptions, load_classifier
from processors.e5convert import build_model

DATA = Path(__file__).resolve().parent.parent / "data"


@pytest.fixture(scope="session")
def e5_dir() -> Path:
    """The converted multilingual-e5-small folder (the same build `model build` runs)."""
    return build_model(progress=None).folder


@pytest.fixture(scope="session")
def classifier_options(e5_dir: Path) -> ClassifierOptions:
    return ClassifierOptions(model_dir=e5_dir)


@pytest.fixture(scope="session")
def classifier(classifier_options: ClassifierOptions) -> Classifier:
    """The classifier as the service loads it: the default encoder and processors/heads."""
    return load_classifier(classifier_options)
