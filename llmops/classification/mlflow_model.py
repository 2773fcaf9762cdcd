"""The MLflow model (models-from-code): this file is logged with every registered version.

`mlflow.pyfunc.load_model("models:/tweet-sentiment@champion").predict(texts)`
takes a list of texts (or a one-column DataFrame) and returns a DataFrame with,
per text, `label`, `score` (its probability) and `prob_<label>` per class.
The weights are the candidate folder logged as the artifact `candidate`.
"""

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class TextClassifierModel(PythonModel):
    def load_context(self, context):  # untyped: MLflow reads predict's hints as a schema
        from llmops.classification.candidate import Classifier

        self.classifier = Classifier(context.artifacts["candidate"])

    # A DataFrame is what MLflow hands predict after enforcing the signature, and a hint MLflow infers no schema
    # from: without a hint, MLflow prints advice to add one each time this file is loaded.
    def predict(self, context, model_input: pd.DataFrame, params=None):
        if isinstance(model_input, pd.DataFrame):
            texts = model_input.iloc[:, 0].astype(str).tolist()
        else:
            texts = [str(t) for t in model_input]
        probs = self.classifier.predict_proba(texts)
        labels = self.classifier.labels
        frame = pd.DataFrame(probs, columns=[f"prob_{label}" for label in labels])
        frame.insert(0, "score", probs.max(axis=1) if len(texts) else [])
        frame.insert(0, "label", [labels[i] for i in probs.argmax(axis=1)] if len(texts) else [])
        return frame


mlflow.models.set_model(TextClassifierModel())
