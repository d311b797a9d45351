"""The methods a recipe names, each a registry of plain-torch implementations: preference losses
(dpo, kto), GRPO's loss types and advantage scalings, rewards, input transforms. torch is imported
inside the functions, so the recipe's names are checked (by the kind specs) without it."""
