from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.models import tiny_bert

# Tests never reach a model hub: every model is built in the test or shipped by a package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    return tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert")


@pytest.fixture(scope="session")
def tiny_classifier_dir(tmp_path_factory) -> Path:
    return tiny_bert(tmp_path_factory.mktemp("models") / "tiny-clf", task="text-classification")
