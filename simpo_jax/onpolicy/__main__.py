"""`python -m simpo_jax.onpolicy`: see simpo_jax/onpolicy/cli.py."""
from simpo_jax.onpolicy.cli import main

if __name__ == "__main__":
    main()
