"""LightningModules and callbacks: the glue between model code, data and the trainer."""
