"""FID/FCD evaluation: feature networks (Inception or our classifier), float64 statistics, Frechet distance,
distributed generation, references."""
from .classifier import (ClassifierFeatures, ClassifierSpec, ClassifierWeightsError, SmallClassifier,
                         build_classifier_features, load_classifier, save_classifier)
from .config import EvalConfig, check_eval_config
from .features import FEATURE_EXTRACTORS, build_features, extractor_of, feature_dim_of, metric_of
from .fid import FIDEvaluator, SampleSpec, check_compatible, sample_spec
from .frechet import FEATURE_DIM, FeatureMoments, FrechetTerms, all_reduce_moments, frechet_distance
from .generate import rank_indices, sample_inputs, sample_rng
from .inception import (WEIGHTS_ENV, WEIGHTS_FILE, WEIGHTS_SHA256, InceptionFeatures, InceptionWeightsError,
                        build_inception, random_inception_state_dict, resolve_weights_url)
from .precision_recall import knn_radii, manifold_coverage, precision_recall
from .records import best_metric, record_result
from .reference import RefStats, load_ref_stats, save_ref_stats

__all__ = [
    "ClassifierFeatures", "ClassifierSpec", "ClassifierWeightsError", "SmallClassifier", "build_classifier_features",
    "load_classifier", "save_classifier", "FEATURE_EXTRACTORS", "build_features", "extractor_of", "feature_dim_of",
    "metric_of",
    "EvalConfig", "check_eval_config", "FIDEvaluator", "SampleSpec", "check_compatible",
    "sample_spec", "FEATURE_DIM", "FeatureMoments", "FrechetTerms", "all_reduce_moments", "frechet_distance",
    "rank_indices", "sample_inputs", "sample_rng", "WEIGHTS_ENV",
    "WEIGHTS_FILE", "WEIGHTS_SHA256", "InceptionFeatures", "InceptionWeightsError", "build_inception",
    "random_inception_state_dict", "resolve_weights_url", "knn_radii", "manifold_coverage", "precision_recall",
    "best_metric", "record_result", "RefStats", "load_ref_stats", "save_ref_stats",
]
