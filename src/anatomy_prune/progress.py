"""The progress bar every stage uses: tqdm's notebook bar in Jupyter, the console bar elsewhere, imported
without the experimental-API warning tqdm.auto prints (a notebook's first output would carry it)."""
import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from tqdm.auto import tqdm

__all__ = ["tqdm"]
