"""Integrations with other training stacks: transformers.Trainer (`hf_trainer`) and `datasets` pipelines (`hf_datasets`)."""
