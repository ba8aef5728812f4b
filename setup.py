"""Packages ``pipeline`` and ``model`` so ``--setup_file ./setup.py`` ships them to Dataflow."""

import os

import setuptools

HERE = os.path.dirname(os.path.abspath(__file__))


def pinned_requirements() -> list[str]:
    with open(os.path.join(HERE, "requirements.txt")) as handle:
        return [line.strip() for line in handle if line.strip() and not line.startswith("#")]


setuptools.setup(
    name="petscore",
    version="0.1.0",
    description="Distributed batch scoring of image classifiers with Apache Beam and TensorFlow",
    packages=setuptools.find_packages(include=["pipeline", "serving", "reports", "model"]),
    python_requires=">=3.11,<3.13",
    install_requires=pinned_requirements(),
    entry_points={"console_scripts": [
        "petscore-score=pipeline.score:main",
        "petscore-train=model.train:main",
        "petscore-evaluate=model.evaluate:main",
    ]},
)
