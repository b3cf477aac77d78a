"""The sparse text base learner: TF-IDF over word 1-2 grams and character 3-5 grams, and a
multinomial logistic regression (the late-fusion paper stacked two text models; on catalogues
whose category word sits in the title this one is hard to beat).

Stored as pure data like every other part of a bundle: the vocabularies as JSON, the idf weights
and the linear model as safetensors; loading rebuilds scikit-learn's vectorizers around them, so
nothing is unpickled. Its logits are computed on the CPU beside whatever backend runs the neural
models (in-process torch or Triton): a sparse product of a few thousand non-zeros per product.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

KIND = "tfidf"  # its name among the base models (a text model: pipeline.stackers.modality_of)
VECTORIZERS = {  # the baseline recipe of `evaluate --tfidf`, fixed so that a stored vocabulary means one thing
    "word": dict(ngram_range=(1, 2), min_df=2, sublinear_tf=True),
    "char": dict(analyzer="char_wb", ngram_range=(3, 5), min_df=2, sublinear_tf=True, max_features=200_000),
}
C = 10.0  # inverse L2 strength of the logistic regression
NEVER = -30.0  # intercept of a class the training side lacked: its logit stays far below the others


def _vectorizer(name: str, vocabulary: dict[str, int] | None = None):
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(**VECTORIZERS[name], vocabulary=vocabulary, dtype=np.float32)


class TfidfModel:
    """fit(texts, y, n_classes) then logits(texts) -> (B, K) float32."""

    def __init__(self, vocab: dict[str, list[str]], idf: dict[str, np.ndarray], coef: np.ndarray,
                 intercept: np.ndarray):
        self.vocab, self.coef, self.intercept = vocab, np.asarray(coef, np.float32), np.asarray(intercept, np.float32)
        self.vectorizers = {}
        for name, terms in vocab.items():
            v = _vectorizer(name, {t: i for i, t in enumerate(terms)})
            v.idf_ = np.asarray(idf[name], np.float64)
            self.vectorizers[name] = v

    @property
    def n_classes(self) -> int:
        return int(self.coef.shape[0])

    @classmethod
    def fit(cls, texts: Sequence[str], y: np.ndarray, n_classes: int, seed: int = 0) -> "TfidfModel":
        from scipy.sparse import hstack
        from sklearn.linear_model import LogisticRegression

        vocab, idf, blocks = {}, {}, []
        for name in VECTORIZERS:
            v = _vectorizer(name)
            blocks.append(v.fit_transform(texts))
            terms = sorted(v.vocabulary_, key=v.vocabulary_.get)
            vocab[name], idf[name] = terms, v.idf_
        clf = LogisticRegression(C=C, max_iter=2000, random_state=seed).fit(hstack(blocks).tocsr(), y)
        coef = np.zeros((n_classes, clf.coef_.shape[1]), np.float32)
        intercept = np.full(n_classes, NEVER, np.float32)
        if len(clf.classes_) == 2:  # scikit-learn keeps one row for two classes: logits +-z/2 give its softmax
            coef[clf.classes_] = np.stack([-clf.coef_[0], clf.coef_[0]]) / 2
            intercept[clf.classes_] = np.array([-clf.intercept_[0], clf.intercept_[0]]) / 2
        else:
            coef[clf.classes_], intercept[clf.classes_] = clf.coef_, clf.intercept_
        return cls(vocab, idf, coef, intercept)

    def features(self, texts: Sequence[str]):
        from scipy.sparse import hstack

        return hstack([self.vectorizers[name].transform(texts) for name in VECTORIZERS]).tocsr()

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        if not len(texts):
            return np.zeros((0, self.n_classes), np.float32)
        return np.asarray(self.features(texts) @ self.coef.T + self.intercept, np.float32)

    # a bundle's files: <name>.safetensors (idf, coef, intercept) and <name>.vocab.json
    def save(self, directory: Path, name: str = KIND) -> dict[str, str]:
        from safetensors.numpy import save_file

        tensors = {"coef": self.coef, "intercept": self.intercept,
                   **{f"idf.{n}": np.asarray(v.idf_, np.float64) for n, v in self.vectorizers.items()}}
        save_file(tensors, str(Path(directory) / f"{name}.safetensors"))
        (Path(directory) / f"{name}.vocab.json").write_text(json.dumps(self.vocab, ensure_ascii=False))
        return {"file": f"{name}.safetensors", "vocab": f"{name}.vocab.json"}

    @classmethod
    def load(cls, weights: Path, vocab: Path) -> "TfidfModel":
        from safetensors.numpy import load_file

        t = load_file(str(weights))
        terms = json.loads(Path(vocab).read_text())
        if set(terms) != set(VECTORIZERS):
            raise ValueError(f"{vocab}: expected vocabularies {sorted(VECTORIZERS)}, found {sorted(terms)}")
        return cls(terms, {n: t[f"idf.{n}"] for n in VECTORIZERS}, t["coef"], t["intercept"])
