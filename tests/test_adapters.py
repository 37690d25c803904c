"""runtime.adapters against the real frameworks: each adapter gives Encoder's vectors (max abs <= 1e-6) from a local
engine and from a live server, and one end-to-end retrieval per framework, in its own in-memory store (FAISS for
the CLI recipe), ranks the judged document of the shipped SciFact sample first for each judged query. A framework
that is not installed skips its tests with the reason."""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")  # no telemetry attempts from the frameworks' tests
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")

pytest.importorskip("httpx", reason="the server-backed adapters need httpx: pip install 'instructor-stack[client]'")
pytest.importorskip("starlette", reason="the live server needs the [serve] extra")

from runtime import Encoder  # noqa: E402
from runtime.adapters.embedder import Embedder  # noqa: E402
from runtime.deps import MissingDependency  # noqa: E402
from runtime.serve.app import create_app  # noqa: E402
from runtime.serve.config import ServeConfig  # noqa: E402
from tests.conftest import FIXTURES  # noqa: E402
from tests.serve_support import live_server  # noqa: E402

SCIFACT = FIXTURES / "bench-data" / "scifact"
QUERY_INSTRUCTION = "Represent the Scientific question for retrieving supporting documents: "
DOC_INSTRUCTION = "Represent the Scientific document for retrieval: "
TEXTS = ["Aspirin lowers fever.", "Cats sleep a lot.", "", "Clouds bring rain. " * 40]
FRAMEWORKS = {"langchain": "langchain_core", "llama_index": "llama_index.core", "haystack": "haystack", "chroma": "chromadb"}


def framework(name: str):
    """The adapter module, or a skip that says why the framework is missing."""
    try:
        importlib.import_module(FRAMEWORKS[name])
    except ImportError as exc:
        pytest.skip(f"{FRAMEWORKS[name]} is not installed ({exc})")
    return importlib.import_module(f"runtime.adapters.{name}")


def scifact() -> tuple[dict[str, dict], dict[str, str], dict[str, str]]:
    """Corpus (id -> {title, text}), queries (id -> text) and the judged document of each judged query."""
    corpus = {d["_id"]: d for d in map(json.loads, (SCIFACT / "corpus.jsonl").read_text().splitlines())}
    queries = {q["_id"]: q["text"] for q in map(json.loads, (SCIFACT / "queries.jsonl").read_text().splitlines())}
    rows = [line.split("\t") for line in (SCIFACT / "qrels" / "test.tsv").read_text().splitlines()[1:]]
    relevant = {q: d for q, d, score in rows if int(score) > 0}
    assert relevant, "the sample has judged queries"
    return corpus, queries, relevant


def doc_text(doc: dict) -> str:
    return f"{doc['title']}\n{doc['text']}" if doc["title"] else doc["text"]


def close(got, want) -> float:
    return float(np.abs(np.asarray(got, dtype=np.float32) - want).max())


# ---- the engines, a live server, and a source of either kind -----------------------------------------------------


@pytest.fixture(scope="module")
def encoder(tiny_engine):
    with Encoder(tiny_engine) as enc:
        yield enc


@pytest.fixture(scope="module")
def tiny_url(tiny_engine):
    with live_server(create_app(ServeConfig(engine=tiny_engine))) as url:
        yield url


@pytest.fixture(scope="module")
def minilm_url(minilm_engine):
    with live_server(create_app(ServeConfig(engine=minilm_engine))) as url:
        yield url


@pytest.fixture(params=["local", "server"])
def source(request, tiny_engine) -> dict[str, str]:
    """The arguments that point an adapter at the tiny engine file or at a server running it."""
    if request.param == "local":
        return {"model": str(tiny_engine)}
    return {"url": request.getfixturevalue("tiny_url")}


@pytest.fixture(params=["local", "server"])
def minilm_source(request, minilm_engine) -> dict[str, str]:
    if request.param == "local":
        return {"model": str(minilm_engine)}
    return {"url": request.getfixturevalue("minilm_url")}


# ---- what every adapter shares -----------------------------------------------------------------------------------


def test_importing_the_adapters_package_imports_no_framework():
    code = ("import sys, runtime.adapters, runtime.adapters.embedder\n"
            "loaded = [m for m in ('langchain_core', 'llama_index', 'haystack', 'chromadb', 'torch') if m in sys.modules]\n"
            "assert not loaded, loaded\nprint('ok')")
    res = subprocess.run([sys.executable, "-c", code], cwd=FIXTURES.parent.parent, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


@pytest.mark.parametrize("name, extra", [("langchain", "langchain"), ("llama_index", "llama-index"), ("haystack", "haystack"),
                                         ("chroma", "chroma")])
def test_a_missing_framework_names_the_extra_that_installs_it(monkeypatch, name, extra):
    monkeypatch.setitem(sys.modules, FRAMEWORKS[name], None)  # import of it fails, as when it is not installed
    monkeypatch.delitem(sys.modules, f"runtime.adapters.{name}", raising=False)
    with pytest.raises(MissingDependency, match=rf"pip install 'instructor-stack\[{extra}\]'"):
        importlib.import_module(f"runtime.adapters.{name}")


def test_embedder_needs_exactly_one_source(tiny_engine, encoder):
    with pytest.raises(ValueError, match="exactly one of"):
        Embedder()
    with pytest.raises(ValueError, match="got model, encoder"):
        Embedder(str(tiny_engine), encoder=encoder)
    shared = Embedder(encoder=encoder)
    assert shared.source == (str(encoder.manifest.engine), None)
    shared.close()  # an encoder passed in stays open
    assert close(shared.encode([["a: ", "b"]]), encoder.encode([["a: ", "b"]])) == 0


def test_a_hub_name_is_refused_with_the_export_command():
    with pytest.raises(Exception, match="python -m export"):
        Embedder("hkunlp/instructor-large")


# ---- LangChain ---------------------------------------------------------------------------------------------------


def test_langchain_defaults_are_upstreams():
    lc = framework("langchain")
    assert lc.HuggingFaceInstructEmbeddings.model_fields["embed_instruction"].default == "Represent the document for retrieval: "
    assert lc.HuggingFaceInstructEmbeddings.model_fields["query_instruction"].default == (
        "Represent the question for retrieving supporting documents: ")


def test_langchain_vectors_equal_encoder(source, encoder):
    lc = framework("langchain")
    emb = lc.HuggingFaceInstructEmbeddings(model_name=source.get("model"), url=source.get("url"))
    docs = emb.embed_documents(TEXTS)
    query = emb.embed_query("what reduces fever")
    adocs = asyncio.run(emb.aembed_documents(TEXTS))
    aquery = asyncio.run(emb.aembed_query("what reduces fever"))
    want_docs = encoder.encode([[emb.embed_instruction, t] for t in TEXTS])
    want_query = encoder.encode([[emb.query_instruction, "what reduces fever"]])[0]
    assert isinstance(docs, list) and isinstance(docs[0], list) and isinstance(docs[0][0], float)
    assert close(docs, want_docs) <= 1e-6 and close(adocs, want_docs) <= 1e-6
    assert close(query, want_query) <= 1e-6 and close(aquery, want_query) <= 1e-6


def test_langchain_encode_kwargs_and_a_shared_client(encoder):
    lc = framework("langchain")
    emb = lc.HuggingFaceInstructEmbeddings(client=encoder, encode_kwargs={"normalize_embeddings": True, "batch_size": 2},
                                           embed_instruction=DOC_INSTRUCTION)
    want = encoder.encode([[DOC_INSTRUCTION, t] for t in TEXTS], normalize_embeddings=True)
    assert emb.client is encoder and close(emb.embed_documents(TEXTS), want) == 0


def test_langchain_retrieval_in_its_in_memory_store(minilm_source):
    lc = framework("langchain")
    from langchain_core.vectorstores import InMemoryVectorStore

    corpus, queries, relevant = scifact()
    emb = lc.HuggingFaceInstructEmbeddings(model_name=minilm_source.get("model"), url=minilm_source.get("url"),
                                           embed_instruction=DOC_INSTRUCTION, query_instruction=QUERY_INSTRUCTION)
    store = InMemoryVectorStore(embedding=emb)
    store.add_texts([doc_text(d) for d in corpus.values()], ids=list(corpus))
    for qid, did in relevant.items():
        assert store.similarity_search(queries[qid], k=len(corpus))[0].id == did


# ---- LlamaIndex --------------------------------------------------------------------------------------------------


def test_llama_index_vectors_equal_encoder_and_each_instruction_does_what_its_name_says(source, encoder):
    li = framework("llama_index")
    emb = li.InstructorEmbedding(model_name=source.get("model"), url=source.get("url"),
                                 query_instruction=QUERY_INSTRUCTION, text_instruction=DOC_INSTRUCTION)
    want_query = encoder.encode([[QUERY_INSTRUCTION, "what reduces fever"]])[0]
    want_texts = encoder.encode([[DOC_INSTRUCTION, t] for t in TEXTS])
    assert close(emb.get_query_embedding("what reduces fever"), want_query) <= 1e-6  # upstream used text_instruction here
    assert close(emb.get_text_embedding(TEXTS[0]), want_texts[0]) <= 1e-6
    assert close(emb.get_text_embedding_batch(TEXTS), want_texts) <= 1e-6
    assert close(asyncio.run(emb.aget_query_embedding("what reduces fever")), want_query) <= 1e-6
    assert close(asyncio.run(emb.aget_text_embedding_batch(TEXTS)), want_texts) <= 1e-6
    assert close(emb.get_query_embedding("what reduces fever"), encoder.encode([[DOC_INSTRUCTION, "what reduces fever"]])[0]) > 1e-3


def test_llama_index_defaults_are_upstreams_instructor_instructions(encoder):
    li = framework("llama_index")
    emb = li.InstructorEmbedding(encoder=encoder)
    assert close(emb.get_query_embedding("q"), encoder.encode([["Represent the question for retrieving supporting documents: ", "q"]])[0]) == 0
    assert close(emb.get_text_embedding("t"), encoder.encode([["Represent the document for retrieval: ", "t"]])[0]) == 0


def test_llama_index_retrieval_in_its_vector_store_index(minilm_source):
    li = framework("llama_index")
    from llama_index.core import VectorStoreIndex
    from llama_index.core.schema import TextNode

    corpus, queries, relevant = scifact()
    emb = li.InstructorEmbedding(model_name=minilm_source.get("model"), url=minilm_source.get("url"),
                                 query_instruction=QUERY_INSTRUCTION, text_instruction=DOC_INSTRUCTION)
    nodes = [TextNode(text=doc_text(d), id_=did) for did, d in corpus.items()]  # no splitter: nothing to download
    retriever = VectorStoreIndex(nodes, embed_model=emb).as_retriever(similarity_top_k=len(corpus))
    for qid, did in relevant.items():
        assert retriever.retrieve(queries[qid])[0].node.node_id == did


# ---- Haystack ----------------------------------------------------------------------------------------------------


def test_haystack_embedders_equal_encoder_with_meta_fields(source, encoder):
    hs = framework("haystack")
    from haystack import Document

    docs = [Document(content=t, meta={"title": f"T{i}", "n": None}) for i, t in enumerate(TEXTS)]
    text_emb = hs.InstructorTextEmbedder(model=source.get("model"), url=source.get("url"), instruction=QUERY_INSTRUCTION, progress_bar=False)
    doc_emb = hs.InstructorDocumentEmbedder(model=source.get("model"), url=source.get("url"), instruction=DOC_INSTRUCTION,
                                            meta_fields_to_embed=["title", "n"], embedding_separator=" | ", progress_bar=False)
    text_emb.warm_up()
    out = doc_emb.run(documents=docs)["documents"]
    aout = asyncio.run(doc_emb.run_async(documents=docs))["documents"]
    want = encoder.encode([[DOC_INSTRUCTION, f"T{i} | {t}"] for i, t in enumerate(TEXTS)])
    assert close([d.embedding for d in out], want) <= 1e-6 and close([d.embedding for d in aout], want) <= 1e-6
    assert [d.id for d in out] == [d.id for d in docs] and all(d.embedding is None for d in docs)  # copies
    want_q = encoder.encode([[QUERY_INSTRUCTION, "what reduces fever"]])[0]
    assert close(text_emb.run(text="what reduces fever")["embedding"], want_q) <= 1e-6
    assert close(asyncio.run(text_emb.run_async(text="what reduces fever"))["embedding"], want_q) <= 1e-6
    with pytest.raises(TypeError, match="expects a string"):
        text_emb.run(text=docs)


def test_haystack_serialization_round_trip_keeps_the_key_out(tiny_engine, monkeypatch):
    hs = framework("haystack")
    from haystack.utils import Secret

    monkeypatch.setenv("MY_KEY", "s3cret")
    emb = hs.InstructorDocumentEmbedder(url="http://127.0.0.1:9", api_key=Secret.from_env_var("MY_KEY"), meta_fields_to_embed=["title"])
    data = emb.to_dict()
    assert "s3cret" not in json.dumps(data)
    again = hs.InstructorDocumentEmbedder.from_dict(data)
    assert again.url == emb.url and again.meta_fields_to_embed == ["title"] and again.api_key.resolve_value() == "s3cret"
    local = hs.InstructorTextEmbedder.from_dict(hs.InstructorTextEmbedder(model=str(tiny_engine), device="cpu").to_dict())
    assert local.model == str(tiny_engine) and local.device == "cpu"


def test_haystack_retrieval_in_pipelines_with_its_in_memory_store(minilm_source, minilm_engine):
    hs = framework("haystack")
    from haystack import Document, Pipeline
    from haystack.components.retrievers.in_memory import InMemoryEmbeddingRetriever
    from haystack.components.writers import DocumentWriter
    from haystack.document_stores.in_memory import InMemoryDocumentStore

    corpus, queries, relevant = scifact()
    shared = Embedder(minilm_source.get("model"), url=minilm_source.get("url"))  # one engine for both components
    store = InMemoryDocumentStore()
    indexing = Pipeline()
    indexing.add_component("embedder", hs.InstructorDocumentEmbedder(instruction=DOC_INSTRUCTION, meta_fields_to_embed=["title"],
                                                                     encoder=shared.encoder, progress_bar=False))
    indexing.add_component("writer", DocumentWriter(document_store=store))
    indexing.connect("embedder", "writer")
    indexing.run({"embedder": {"documents": [Document(id=did, content=d["text"], meta={"title": d["title"]}) for did, d in corpus.items()]}})
    querying = Pipeline()
    querying.add_component("embedder", hs.InstructorTextEmbedder(instruction=QUERY_INSTRUCTION, encoder=shared.encoder, progress_bar=False))
    querying.add_component("retriever", InMemoryEmbeddingRetriever(document_store=store, top_k=len(corpus)))
    querying.connect("embedder.embedding", "retriever.query_embedding")
    for qid, did in relevant.items():
        assert querying.run({"embedder": {"text": queries[qid]}})["retriever"]["documents"][0].id == did
    shared.close()


# ---- Chroma ------------------------------------------------------------------------------------------------------


def test_chroma_function_equals_encoder(source, encoder):
    ch = framework("chroma")
    ef = ch.InstructorEmbeddingFunction(model_name=source.get("model"), url=source.get("url"), instruction=DOC_INSTRUCTION,
                                        query_instruction=QUERY_INSTRUCTION)
    assert close(ef(TEXTS), encoder.encode([[DOC_INSTRUCTION, t] for t in TEXTS])) <= 1e-6
    assert close(ef.embed_query(["what reduces fever"]), encoder.encode([[QUERY_INSTRUCTION, "what reduces fever"]])) <= 1e-6
    plain = ch.InstructorEmbeddingFunction(model_name=source.get("model"), url=source.get("url"))
    assert close(plain(TEXTS), encoder.encode(TEXTS)) <= 1e-6  # no instruction: plain strings, as upstream
    assert close(plain.embed_query(["q"]), encoder.encode(["q"])) <= 1e-6
    assert not ef.is_legacy() and ef.name() == "instructor_stack"
    rebuilt = ch.InstructorEmbeddingFunction.build_from_config(ef.get_config())
    assert close(rebuilt(TEXTS[:1]), encoder.encode([[DOC_INSTRUCTION, TEXTS[0]]])) <= 1e-6


def test_chroma_retrieval_in_an_ephemeral_client(minilm_source):
    ch = framework("chroma")
    import chromadb

    corpus, queries, relevant = scifact()
    ef = ch.InstructorEmbeddingFunction(model_name=minilm_source.get("model"), url=minilm_source.get("url"),
                                        instruction=DOC_INSTRUCTION, query_instruction=QUERY_INSTRUCTION)
    client = chromadb.EphemeralClient(settings=chromadb.Settings(anonymized_telemetry=False))
    collection = client.create_collection(f"scifact-{uuid.uuid4().hex}", embedding_function=ef)
    collection.add(ids=list(corpus), documents=[doc_text(d) for d in corpus.values()])
    for qid, did in relevant.items():
        assert collection.query(query_texts=[queries[qid]], n_results=len(corpus))["ids"][0][0] == did


# ---- FAISS: the documented recipe ----------------------------------------------------------------------------------


def test_faiss_recipe_from_the_encode_cli(tmp_path, minilm_engine):
    faiss = pytest.importorskip("faiss", reason="faiss-cpu is not installed")
    corpus, queries, relevant = scifact()
    rows = tmp_path / "corpus.jsonl"
    rows.write_text("".join(json.dumps({"id": did, "text": doc_text(d)}) + "\n" for did, d in corpus.items()))
    out = tmp_path / "corpus.npy"
    cmd = [sys.executable, "-m", "runtime.encode", "--engine", str(minilm_engine), "--input", str(rows), "--output", str(out),
           "--instruction", DOC_INSTRUCTION, "--quiet"]
    res = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    index = faiss.IndexFlatIP(np.load(out).shape[1])  # the two lines of docs/integrations.md
    index.add(np.load(out))
    ids = list(corpus)
    with Encoder(minilm_engine) as enc:
        q = enc.encode([[QUERY_INSTRUCTION, queries[qid]] for qid in relevant])
    _, top = index.search(q, len(ids))
    assert [ids[row[0]] for row in top] == list(relevant.values())


def test_chroma_persisted_collection_reopens_with_the_same_function(tmp_path, tiny_engine, encoder):
    ch = framework("chroma")
    import chromadb

    settings = chromadb.Settings(anonymized_telemetry=False, allow_reset=True)
    ef = ch.InstructorEmbeddingFunction(encoder=encoder, instruction=DOC_INSTRUCTION, query_instruction=QUERY_INSTRUCTION)
    first = chromadb.PersistentClient(path=str(tmp_path / "db"), settings=settings)
    first.create_collection("docs", embedding_function=ef).add(ids=["a", "b"], documents=TEXTS[:2])
    reopened = chromadb.PersistentClient(path=str(tmp_path / "db"), settings=settings).get_collection("docs")
    stored = reopened.get(ids=["a", "b"], include=["embeddings"])["embeddings"]
    assert close(stored, encoder.encode([[DOC_INSTRUCTION, t] for t in TEXTS[:2]])) <= 1e-6
    found = reopened.query(query_texts=["what reduces fever"], n_results=2, include=["distances"])  # embedded by the rebuilt function
    q = encoder.encode([[QUERY_INSTRUCTION, "what reduces fever"]])[0]
    want = {i: 1 - float(q @ v) for i, v in zip(["a", "b"], encoder.encode([[DOC_INSTRUCTION, t] for t in TEXTS[:2]]))}
    assert dict(zip(found["ids"][0], found["distances"][0])) == pytest.approx(want, abs=1e-5)
    assert ef.get_config()["model_name"] == str(tiny_engine) and "api_key" not in ef.get_config()
