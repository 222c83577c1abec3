"""OpenAI's files and fine-tuning API over this server: uploaded training files
(datasets.py checks them), jobs kept in SQLite (store.py), trained one at a time in a
process of their own (runner.py, trainer.py), and the adapter each job produces served
under its `fine_tuned_model` name (naming.py)."""
