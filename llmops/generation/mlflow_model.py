"""The MLflow model of a generator (models-from-code): this file is logged with every registered version.

    model = mlflow.pyfunc.load_model("models:/tweet-generator@champion")
    model.predict(["write a positive tweet about coachella"], params={"max_new_tokens": 40, "temperature": 0.8})
    model.predict([{"messages": [{"role": "user", "content": "classify the sentiment of this tweet: great crew"}]}])

Input: a list of prompts (given to the model as written), or records / a DataFrame with a `prompt` or a
`messages` column (a chat, rendered with the model's chat template). Params: `max_new_tokens`, `temperature`
(0: greedy), `top_p`, `seed`, `stop` (a list of strings), `min_new_tokens` (tokens written before the end token
may end the text: 1 by default, so an answer is never empty; 0 allows an empty one). Output: a DataFrame with,
per input, `text`, `finish_reason` (`stop` or `length`), `prompt_tokens` and `completion_tokens`.
"""

import math

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel


def _is_missing(value):
    return value is None or (isinstance(value, float) and math.isnan(value))


def _prompts(model_input):
    """The prompts of any accepted input shape, in order: strings, or lists of {role, content}."""
    records = model_input.to_dict("records") if isinstance(model_input, pd.DataFrame) else list(model_input)
    prompts = []
    for record in records:
        if isinstance(record, dict):
            chat = record.get("messages")
            if not _is_missing(chat):
                prompts.append([dict(m) for m in chat])
                continue
            record = record.get("prompt", record.get(0))
        if isinstance(record, list | np.ndarray):
            prompts.append([dict(m) for m in record])
        else:
            prompts.append(str(record))
    return prompts


class TextGeneratorModel(PythonModel):
    def load_context(self, context):  # untyped: MLflow reads predict's hints as a schema
        from llmops.generation.loading import load_generator

        self.generator = load_generator(context.artifacts["candidate"])

    # A DataFrame is what MLflow hands predict after enforcing the signature, and a hint MLflow infers no schema
    # from: without a hint, MLflow prints advice to add one each time this file is loaded.
    def predict(self, context, model_input: pd.DataFrame, params=None):
        from llmops.generation.candidate import GenerationParams

        params = params or {}
        seed = params.get("seed")
        generation = GenerationParams(
            max_new_tokens=int(params.get("max_new_tokens", 64)),
            temperature=float(params.get("temperature", 0.0)),
            top_p=float(params.get("top_p", 1.0)),
            stop=tuple(params.get("stop") or ()),
            seed=None if seed is None else int(seed),
            min_new_tokens=int(params.get("min_new_tokens", 1)),
        )
        results = self.generator.generate(_prompts(model_input), generation)
        return pd.DataFrame(
            {
                "text": [r.text for r in results],
                "finish_reason": [r.finish_reason for r in results],
                "prompt_tokens": [r.prompt_tokens for r in results],
                "completion_tokens": [r.completion_tokens for r in results],
            }
        )


mlflow.models.set_model(TextGeneratorModel())
