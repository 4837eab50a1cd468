"""Media and text of one sample: image and video probing/decoding, IAP tiling, ADS budgeting, prompts."""
