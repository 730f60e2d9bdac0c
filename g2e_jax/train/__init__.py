"""Contrastive fine-tuning: mesh and sharding, loss, adapters, GradCache, optimizer, step."""
