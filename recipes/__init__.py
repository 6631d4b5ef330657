"""The recipes that ship with finetune: this folder is installed as the package data `finetune.recipes`.

`finetune recipes` lists them; a recipe argument may name one (`finetune train quick_cpu --data DIR`).
"""
