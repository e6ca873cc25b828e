"""The effrepro_mc task's questions: effrepro_mc.jsonl beside this file, read by the `datasets` json loader. A
`data_files` path in the task YAML would be resolved against the working directory, so the YAML names this
function instead (lm-eval's `custom_dataset`)."""
from pathlib import Path

import datasets


def load(**_) -> datasets.DatasetDict:
    return datasets.load_dataset("json", data_files={"test": str(Path(__file__).with_name("effrepro_mc.jsonl"))})
