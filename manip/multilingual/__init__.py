"""English and Russian for EmojiWorld: Russian captions, telling a prompt's language, and a
CLIP-format tokenizer trained on both languages."""
from .corpus import bilingual_captions
from .language import LanguageError, detect_language
from .russian import N_PHRASINGS_RU, all_captions_ru, caption_ru, fold_yo
from .tokenizer import build_bilingual_tokenizer, save_bilingual_tokenizer

__all__ = [
    "LanguageError", "N_PHRASINGS_RU", "all_captions_ru", "bilingual_captions", "build_bilingual_tokenizer",
    "caption_ru", "detect_language", "fold_yo", "save_bilingual_tokenizer",
]
