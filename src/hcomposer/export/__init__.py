"""Export: a trained model as a Hugging Face folder (``folder``), through a native class where
one fits (Llama in ``folder``, Bamba in ``native``), else with self-contained remote code
(``remote``); every folder gets a model card (``model_card``)."""

from hcomposer.export.folder import *  # noqa: F403  (the public API, listed once there)
from hcomposer.export.folder import __all__  # noqa: F401
