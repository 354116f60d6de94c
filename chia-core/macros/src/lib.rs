//! The `#[chia::function]`, `#[chia::service]`, `#[chia::provider]` and `#[chia::condition]`
//! attribute macros, re-exported by the runtime under those names (`service` is described in
//! the `service` module, the bypass pair in the `bypass` module).
//!
//! ```text
//! #[chia::function(resources(adder = 1, "node:head" = 0.5), num_cpus = 2, max_retries = 3, timeout_s = 3600, name = "add")]
//! fn simple_add(x: i64, y: i64) -> i64 { x + y }
//! ```
//!
//! The function is emitted unchanged, so it stays callable locally. Next to it the macro emits
//! a module with the same name (modules live in the type namespace, so both coexist) holding
//! the remote handle:
//!
//! - `SPEC: ::chia::__private::FunctionSpec` — name, normalised signature (`add(i64,i64)->i64`,
//!   the context parameter left out), the first 16 hex digits of its SHA-256, fixed-point
//!   resources (1.0 = 10,000, parsed from the literal's text at compile time), `num_cpus`,
//!   `max_retries`, `retry_exceptions`, the `timeout` (`timeout_s` as a `Duration`, exact to the
//!   millisecond), the argument count, the invoker and the `setup` / `cleanup` hooks (each its
//!   path's text and a wrapper, or `None`). A copy is submitted to `inventory`, so a worker
//!   finds every function linked into its binary by name.
//! - `call(args..) -> Call<T>`, `remote(cx, args..) -> ObjectRef<T>` and
//!   `remote_blocking(cx, args..) -> Result<T, ::chia::Error>`, where each argument is
//!   `impl IntoArg<ParamType>` and `T` is the value type: the return type, `()` when there is
//!   none, or the `Ok` type of a `Result<T, E>` (whose `E` must implement `Display`).
//! - `__invoke`, which checks the argument count, decodes each argument, calls the function
//!   (passing the worker's context first when the function declares a `Context` or `&Context`
//!   first parameter), awaits it when it is `async`, and encodes the result or the error.
//!
//! With `setup = path` / `cleanup = path`, a private wrapper per hook (`__chia_setup_<fn>`,
//! `__chia_cleanup_<fn>`) is emitted next to the function, so the path resolves as it would
//! in the function's own module. It calls `path(&attempt)` (cleanup: `path(&attempt, &ended)`)
//! and tells by the return type whether the hook is `async` and returns `()` or a `Result`;
//! the call carries the path's span, so a hook that does not exist or has the wrong signature
//! is reported at the path in the attribute.
//!
//! Items in the module are `pub` when the function is visible outside its module, otherwise
//! `pub(super)`. All generated code names the runtime by absolute `::chia::` paths. The
//! function must be a free function at module level (not inside a block or an `impl`).

mod bypass;
mod service;
mod signature;

use proc_macro::TokenStream;
use proc_macro2::TokenStream as TokenStream2;
use quote::{ToTokens, format_ident, quote, quote_spanned};
use syn::ext::IdentExt;
use syn::parse::{Parse, ParseStream};
use syn::spanned::Spanned;
use syn::{Error, Ident, ItemFn, Lit, LitStr, Token, Visibility, parenthesized};

use crate::signature::{
    Param, Params, Subject, analyze_output, analyze_params, compact, decode_args, finish, sig_hash,
};

/// Registers a function for remote execution; see the crate documentation for the expansion.
///
/// Options (all optional): `resources(name = amount, "other:name" = amount, ..)`,
/// `num_cpus = N` (default 1), `max_retries = N` (default 3, `max_retries = forever` without
/// limit — Ray's and CHIA's `-1`; how often a call runs again after its worker is lost), `retry_exceptions = true` (an `Err`, or a run
/// stopped by its timeout, also runs it again, within `max_retries`), `timeout_s = N` (seconds,
/// an integer or a decimal such as `2.5`, more than 0, at most 3 decimals: a run that takes
/// longer is cancelled with force — its processes killed — and fails with `TimedOut`; default:
/// no limit; `.timeout(..)` / `.no_timeout()` override it per call), `setup = path` and
/// `cleanup = path` (hooks run on the worker around every attempt, see below) and
/// `name = "..."` (the stable name, default the function's identifier).
///
/// # Setup and cleanup hooks
///
/// `#[chia::function(setup = prepare_tools, cleanup = remove_scratch)]` runs, on the worker,
/// `prepare_tools` before every attempt (each retry included) and `remove_scratch` after every
/// attempt whose setup succeeded — after a value, an `Err`, a panic, a cancellation (forced
/// or not) and a timeout alike — before the outcome is reported. The paths name functions as
/// they would be written in the function's module:
///
/// ```text
/// fn prepare_tools(attempt: &chia::hooks::Attempt) -> Result<(), E>            // or -> ()
/// async fn remove_scratch(attempt: &chia::hooks::Attempt, ended: &chia::hooks::Ended)   // sync or async
/// ```
///
/// `Attempt` gives the function's name, the task, the attempt number (1 for the first), the
/// call's tag and the task's `Context`; `Ended` says how the attempt ended (`Returned`,
/// `Failed(error)`, `Cancelled`, `TimedOut`). A setup that returns `Err` skips the function and
/// the cleanup and fails the attempt with `TaskError::SetupFailed` naming the hook and the
/// function (retried under `retry_exceptions`, like an `Err`); one that panics fails it with
/// `Panic`. A cleanup that fails or panics is logged and leaves the outcome alone. Bypassed
/// calls run no hooks. The whole contract is in the runtime's `chia::hooks` module.
#[proc_macro_attribute]
pub fn function(attr: TokenStream, item: TokenStream) -> TokenStream {
    let item_fn = syn::parse_macro_input!(item as ItemFn);
    match syn::parse::<Options>(attr).and_then(|options| expand(options, &item_fn)) {
        Ok(tokens) => tokens.into(),
        // Keep the function itself, so one mistake does not cascade into "not found" errors.
        Err(error) => {
            let mut tokens = error.to_compile_error();
            item_fn.to_tokens(&mut tokens);
            tokens.into()
        }
    }
}

/// Makes a stateful remote service (like a Ray actor) of an inherent `impl` block; see the
/// `service` module for the expansion.
///
/// The block needs a `pub fn new(..)` constructor (sync or async, optionally taking
/// `cx: &chia::Context` first, returning `Self` or `Result<Self, E>`). Every `pub fn` with a
/// `&self` or `&mut self` receiver is a remote method, callable through the generated
/// `<Type>Handle`. The only option is `name = "..."` (the stable type name, default the type's
/// identifier).
#[proc_macro_attribute]
pub fn service(attr: TokenStream, item: TokenStream) -> TokenStream {
    let item_impl = match syn::parse::<syn::Item>(item) {
        Ok(syn::Item::Impl(item_impl)) => item_impl,
        Ok(other) => {
            let mut tokens =
                Error::new_spanned(&other, "`#[chia::service]` goes on an inherent `impl Type { .. }` block")
                    .to_compile_error();
            other.to_tokens(&mut tokens);
            return tokens.into();
        }
        Err(error) => return error.to_compile_error().into(),
    };
    match syn::parse::<service::Options>(attr).and_then(|options| service::expand(options, &item_impl)) {
        Ok(tokens) => tokens.into(),
        // Keep the impl block itself, so one mistake does not cascade into "not found" errors.
        Err(error) => {
            let mut tokens = error.to_compile_error();
            item_impl.to_tokens(&mut tokens);
            tokens.into()
        }
    }
}

/// Registers a bypass provider under a name (option `name = "..."`, default the function's
/// identifier): `fn(call: &chia::bypass::BypassCall) -> T` (or `async`, or `Result<T, E>`),
/// where `T` is the bypassed function's value type or `chia::bypass::Provided`. The module
/// of the same name holds `PROVIDER`, which `Bypass::set_provider` takes.
#[proc_macro_attribute]
pub fn provider(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand_bypass(bypass::Kind::Provider, attr, item)
}

/// Registers a bypass condition under a name (option `name = "..."`): `fn(call:
/// &chia::bypass::BypassCall) -> bool` (or `async`, or `Result<bool, E>`). The module of the
/// same name holds `CONDITION`, which `Bypass::set_cond` takes.
#[proc_macro_attribute]
pub fn condition(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand_bypass(bypass::Kind::Condition, attr, item)
}

fn expand_bypass(kind: bypass::Kind, attr: TokenStream, item: TokenStream) -> TokenStream {
    let item_fn = syn::parse_macro_input!(item as ItemFn);
    match syn::parse::<bypass::Options>(attr).and_then(|options| bypass::expand(kind, options, &item_fn)) {
        Ok(tokens) => tokens.into(),
        Err(error) => {
            let mut tokens = error.to_compile_error();
            item_fn.to_tokens(&mut tokens);
            tokens.into()
        }
    }
}

const VALID_OPTIONS: &str = "valid options are `resources(name = amount, ..)`, `num_cpus = N`, \
                             `max_retries = N`, `retry_exceptions = true`, `timeout_s = N`, \
                             `setup = path`, `cleanup = path` and `name = \"...\"`";

struct Options {
    name: Option<String>,
    resources: Vec<(String, u64)>,
    num_cpus: u64,
    max_retries: chia_core::Retries,
    retry_exceptions: bool,
    /// `timeout_s`, in milliseconds.
    timeout_ms: Option<u64>,
    /// `setup = path`: the hook run before every attempt.
    setup: Option<syn::Path>,
    /// `cleanup = path`: the hook run after every attempt whose setup succeeded.
    cleanup: Option<syn::Path>,
}

impl Parse for Options {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        let mut options = Options {
            name: None,
            resources: Vec::new(),
            num_cpus: chia_core::ResourceAmount::SCALE,
            max_retries: chia_core::Retries::UpTo(3),
            retry_exceptions: false,
            timeout_ms: None,
            setup: None,
            cleanup: None,
        };
        let mut seen: Vec<String> = Vec::new();
        while !input.is_empty() {
            let key = input.call(Ident::parse_any)?;
            let key_text = key.to_string();
            if seen.contains(&key_text) {
                return Err(Error::new_spanned(&key, format!("option `{key_text}` is given twice")));
            }
            match key_text.as_str() {
                "resources" => {
                    let content;
                    parenthesized!(content in input);
                    options.resources = parse_resources(&content)?;
                }
                "num_cpus" => {
                    input.parse::<Token![=]>()?;
                    options.num_cpus = parse_amount(input)?;
                }
                "max_retries" => {
                    input.parse::<Token![=]>()?;
                    options.max_retries = parse_max_retries(input)?;
                }
                "retry_exceptions" => {
                    input.parse::<Token![=]>()?;
                    options.retry_exceptions = input.parse::<syn::LitBool>()?.value;
                }
                "timeout_s" => {
                    input.parse::<Token![=]>()?;
                    options.timeout_ms = Some(parse_timeout_s(input)?);
                }
                "name" => {
                    input.parse::<Token![=]>()?;
                    options.name = Some(parse_name(input)?);
                }
                "setup" => {
                    input.parse::<Token![=]>()?;
                    options.setup = Some(parse_hook_path(input, "setup")?);
                }
                "cleanup" => {
                    input.parse::<Token![=]>()?;
                    options.cleanup = Some(parse_hook_path(input, "cleanup")?);
                }
                _ => {
                    return Err(Error::new_spanned(
                        &key,
                        format!("unknown option `{key_text}`; {VALID_OPTIONS}"),
                    ));
                }
            }
            seen.push(key_text);
            if !input.is_empty() {
                input.parse::<Token![,]>()?;
            }
        }
        Ok(options)
    }
}

/// Parses the path of a `setup = path` / `cleanup = path` option: a function's path, as it
/// would be written in the function's module.
fn parse_hook_path(input: ParseStream, option: &str) -> syn::Result<syn::Path> {
    input.call(syn::Path::parse_mod_style).map_err(|e| {
        Error::new(
            e.span(),
            format!("`{option} = ..` takes the path of a function, such as `{option} = prepare_tools` or `{option} = tools::prepare`"),
        )
    })
}

/// The hook's path as text, for errors and logs: `tools::prepare`.
fn path_text(path: &syn::Path) -> String {
    let segments: Vec<String> = path.segments.iter().map(|s| s.ident.unraw().to_string()).collect();
    let text = segments.join("::");
    if path.leading_colon.is_some() { format!("::{text}") } else { text }
}

/// The wrapper of a hook, emitted next to the function (so the path resolves as the user
/// wrote it) and named by the generated module as `super::#wrapper`. It calls the hook on
/// the attempt (and, for cleanup, how it ended); whether the hook is `async` and whether it
/// returns `()` or a `Result` is told apart by the types, through `hook_kind()`. Every token
/// that can fail to type-check carries the path's span, so a missing hook or a wrong
/// signature is reported at the path in the attribute.
fn hook_wrapper(path: &syn::Path, wrapper: &Ident, cleanup: bool) -> (TokenStream2, TokenStream2) {
    let span = path.span();
    let name = path_text(path);
    let call = if cleanup {
        quote_spanned!(span=> #path(&__chia_attempt, &__chia_ended))
    } else {
        quote_spanned!(span=> #path(&__chia_attempt))
    };
    let finish = quote_spanned! {span=>
        (&&&__chia_returned).hook_kind().finish(__chia_returned).await
    };
    let params = if cleanup {
        quote!(__chia_attempt: ::chia::hooks::Attempt, __chia_ended: ::chia::hooks::Ended)
    } else {
        quote!(__chia_attempt: ::chia::hooks::Attempt)
    };
    let wrapper_fn = quote! {
        #[doc(hidden)]
        #[allow(non_snake_case)]
        fn #wrapper(#params) -> ::chia::__private::BoxFuture<::std::result::Result<(), ::std::string::String>> {
            ::std::boxed::Box::pin(async move {
                #[allow(unused_imports)]
                use ::chia::__private::hooks::{AsyncHook as _, NotAHook as _, SyncHook as _};
                let __chia_returned = ::chia::__private::hooks::Returned(#call);
                #finish
            })
        }
    };
    let hook = if cleanup {
        quote!(::chia::__private::hooks::CleanupHook { name: #name, run: super::#wrapper })
    } else {
        quote!(::chia::__private::hooks::SetupHook { name: #name, run: super::#wrapper })
    };
    (wrapper_fn, quote!(::std::option::Option::Some(#hook)))
}

/// Parses the string literal of a `name = "..."` option: non-empty, without whitespace.
fn parse_name(input: ParseStream) -> syn::Result<String> {
    let name: LitStr = input.parse()?;
    let text = name.value();
    if text.is_empty() || text.chars().any(char::is_whitespace) {
        return Err(Error::new_spanned(name, "the name must be non-empty and without whitespace"));
    }
    Ok(text)
}

/// Parses `name = amount, "other:name" = amount, ..` (the inside of `resources(..)`).
fn parse_resources(input: ParseStream) -> syn::Result<Vec<(String, u64)>> {
    let mut resources: Vec<(String, u64)> = Vec::new();
    while !input.is_empty() {
        let (name, span) = if input.peek(LitStr) {
            let lit: LitStr = input.parse()?;
            (lit.value(), lit.span())
        } else {
            let ident = input.call(Ident::parse_any).map_err(|e| {
                Error::new(e.span(), "expected a resource name (an identifier or a string literal)")
            })?;
            (ident.unraw().to_string(), ident.span())
        };
        if name.is_empty() || name.contains([',', '=']) || name.chars().any(char::is_whitespace) {
            return Err(Error::new(
                span,
                "a resource name must be non-empty, without ',', '=' or whitespace",
            ));
        }
        if name.eq_ignore_ascii_case("cpu") {
            return Err(Error::new(span, "request CPUs with the `num_cpus = N` option, not as a resource"));
        }
        if resources.iter().any(|(n, _)| *n == name) {
            return Err(Error::new(span, format!("resource `{name}` is given twice")));
        }
        input.parse::<Token![=]>()?;
        resources.push((name, parse_amount(input)?));
        if !input.is_empty() {
            input.parse::<Token![,]>()?;
        }
    }
    Ok(resources)
}

/// Parses a non-negative int or float literal into fixed point, from its decimal text.
fn parse_amount(input: ParseStream) -> syn::Result<u64> {
    if input.peek(Token![-]) {
        let minus: Token![-] = input.parse()?;
        let lit: Lit = input.parse()?;
        return Err(Error::new_spanned(quote!(#minus #lit), "amounts must be non-negative"));
    }
    let lit = parse_number(input)?;
    let text = match &lit {
        Lit::Int(int) => int.base10_digits().to_string(),
        Lit::Float(float) => float.base10_digits().to_string(),
        _ => unreachable!("parse_number returns numbers only"),
    };
    fixed_point(&text).map_err(|message| Error::new_spanned(&lit, message))
}

fn parse_number(input: ParseStream) -> syn::Result<Lit> {
    let lit: Lit = input.parse().map_err(|e| Error::new(e.span(), "expected a number literal"))?;
    match lit {
        Lit::Int(_) | Lit::Float(_) => Ok(lit),
        other => Err(Error::new_spanned(other, "expected a number literal")),
    }
}

/// `"1.25"` → 12,500: `chia-core`'s parsing, the one the runtime uses for amounts (exact, at
/// most 4 decimals, no sign or exponent).
fn fixed_point(text: &str) -> Result<u64, String> {
    text.parse::<chia_core::ResourceAmount>()
        .map(chia_core::ResourceAmount::as_fixed)
        .map_err(|e| e.to_string())
}

/// `max_retries = 3` or `max_retries = forever`; a negative number is an error that says how
/// to write "forever", so no sentinel reaches the runtime.
fn parse_max_retries(input: ParseStream) -> syn::Result<chia_core::Retries> {
    if input.peek(Ident) {
        let word: Ident = input.parse()?;
        return if word == "forever" {
            Ok(chia_core::Retries::Forever)
        } else {
            Err(Error::new_spanned(word, "`max_retries` is a number of retries or `forever`"))
        };
    }
    if input.peek(Token![-]) {
        let minus: Token![-] = input.parse()?;
        let lit: Lit = input.parse()?;
        return Err(Error::new_spanned(
            quote!(#minus #lit),
            "write `max_retries = forever` to retry without limit (Ray's and CHIA's `-1`)",
        ));
    }
    let lit = parse_number(input)?;
    let Lit::Int(int) = &lit else {
        return Err(Error::new_spanned(lit, "`max_retries` must be a whole number or `forever`"));
    };
    let retries = int
        .base10_parse::<u32>()
        .map_err(|_| Error::new_spanned(&lit, "`max_retries` must be at most 4294967295 (or `forever`)"))?;
    Ok(if retries == 0 { chia_core::Retries::Never } else { chia_core::Retries::UpTo(retries) })
}

/// Parses the seconds of `timeout_s = N` into milliseconds, exactly: more than 0, an integer
/// or a decimal with at most 3 decimals.
fn parse_timeout_s(input: ParseStream) -> syn::Result<u64> {
    if input.peek(Token![-]) {
        let minus: Token![-] = input.parse()?;
        let lit: Lit = input.parse()?;
        return Err(Error::new_spanned(
            quote!(#minus #lit),
            "`timeout_s` must be more than 0 seconds (leave it out for no timeout)",
        ));
    }
    let lit = parse_number(input).map_err(|e| {
        Error::new(e.span(), "`timeout_s` takes a number of seconds, such as `3600` or `2.5`")
    })?;
    let text = match &lit {
        Lit::Int(int) => int.base10_digits().to_string(),
        Lit::Float(float) => float.base10_digits().to_string(),
        _ => unreachable!("parse_number returns numbers only"),
    };
    timeout_millis(&text).map_err(|message| Error::new_spanned(&lit, message))
}

/// `"2.5"` → 2,500 milliseconds. Exact: no float arithmetic.
fn timeout_millis(text: &str) -> Result<u64, String> {
    let (whole, frac) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits(whole) || !digits(frac) {
        return Err("write `timeout_s` as a plain number of seconds such as `3600` or `2.5`".to_string());
    }
    if frac.len() > 3 {
        return Err("`timeout_s` has at most 3 decimals (milliseconds)".to_string());
    }
    let frac_millis = format!("{frac:0<3}").parse::<u64>().unwrap_or(0);
    let millis = whole
        .parse::<u64>()
        .ok()
        .and_then(|w| w.checked_mul(1000))
        .and_then(|w| w.checked_add(frac_millis))
        .ok_or_else(|| "`timeout_s` is too large".to_string())?;
    if millis == 0 {
        return Err("`timeout_s` must be more than 0 seconds (leave it out for no timeout)".to_string());
    }
    Ok(millis)
}

fn expand(options: Options, item: &ItemFn) -> syn::Result<TokenStream2> {
    let sig = &item.sig;
    let fn_ident = &sig.ident;
    if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
        return Err(Error::new_spanned(&sig.generics, "remote functions cannot be generic"));
    }
    if let Some(unsafety) = &sig.unsafety {
        return Err(Error::new_spanned(unsafety, "remote functions cannot be `unsafe`"));
    }
    if let Some(variadic) = &sig.variadic {
        return Err(Error::new_spanned(variadic, "remote functions cannot be variadic"));
    }

    let subject = Subject { noun: "remote function", context_place: "the first parameter", self_ty: None };
    let Params { context, params } = analyze_params(&sig.inputs, &subject)?;
    let output = analyze_output(&sig.output, &subject)?;
    let value_ty = &output.value_ty;

    let name = options.name.unwrap_or_else(|| fn_ident.unraw().to_string());
    let signature = {
        let args: Vec<String> = params.iter().map(|p| compact(p.ty.to_token_stream())).collect();
        format!("{name}({})->{}", args.join(","), output.text)
    };
    let sig_hash = sig_hash(&signature);
    let resources = options.resources.iter().map(|(name, amount)| quote!((#name, #amount)));
    let (num_cpus, retry_exceptions) = (options.num_cpus, options.retry_exceptions);
    let max_retries = match options.max_retries {
        chia_core::Retries::Never => quote!(::chia::Retries::Never),
        chia_core::Retries::UpTo(limit) => quote!(::chia::Retries::UpTo(#limit)),
        chia_core::Retries::Forever => quote!(::chia::Retries::Forever),
    };
    let timeout = match options.timeout_ms {
        Some(ms) => quote!(::std::option::Option::Some(::std::time::Duration::from_millis(#ms))),
        None => quote!(::std::option::Option::None),
    };
    let arg_count = params.len();
    let cfgs: Vec<_> = item.attrs.iter().filter(|attr| attr.path().is_ident("cfg")).collect();
    // The wrappers share the function's `cfg`s, like the module that names them.
    let hook = |path: &Option<syn::Path>, kind: &str, cleanup: bool| match path {
        Some(path) => {
            let wrapper = format_ident!("__chia_{kind}_{}", fn_ident.unraw());
            let (wrapper_fn, hook) = hook_wrapper(path, &wrapper, cleanup);
            (quote!(#(#cfgs)* #wrapper_fn), hook)
        }
        None => (quote!(), quote!(::std::option::Option::None)),
    };
    let (setup_fn, setup) = hook(&options.setup, "setup", false);
    let (cleanup_fn, cleanup) = hook(&options.cleanup, "cleanup", true);

    let (mod_vis, item_vis) = match &item.vis {
        Visibility::Inherited => (quote!(), quote!(pub(super))),
        vis => (vis.to_token_stream(), quote!(pub)),
    };
    let mod_doc =
        format!("Remote handle of [`{fn_ident}()`], registered as `{name}` (signature `{signature}`).");

    // `call`/`remote` take each parameter as `impl IntoArg<Type>`.
    let names: Vec<&Ident> = params.iter().map(|p| &p.ident).collect();
    let inputs: Vec<TokenStream2> =
        params.iter().map(|Param { ident, ty }| quote!(#ident: impl ::chia::IntoArg<#ty>)).collect();
    let cx = if names.iter().any(|n| *n == "cx") { format_ident!("__chia_cx") } else { format_ident!("cx") };

    // The invoker: decode each argument, call, encode.
    let (decoded, decodes) = decode_args(&params, &name, &format_ident!("__chia_args"));
    let context_arg = context.arg(&format_ident!("__chia_cx"));
    let mut call = quote!(super::#fn_ident(#context_arg #(#decoded),*));
    if sig.asyncness.is_some() {
        call = quote!(#call.await);
    }
    let finish = finish(&call, &name, &output);
    let body = quote! {
        ::chia::__private::check_arg_count(#name, #arg_count, &__chia_args)?;
        #decodes
        #finish
    };
    let (invoke_variant, invoke_fn) = if sig.asyncness.is_some() {
        let invoke_fn = quote! {
            fn __invoke(
                __chia_cx: ::chia::Context,
                __chia_args: ::std::vec::Vec<::chia::__private::ArgValue>,
            ) -> ::chia::__private::BoxFuture<
                ::std::result::Result<::chia::__private::Value, ::chia::__private::TaskError>,
            > {
                ::std::boxed::Box::pin(async move { #body })
            }
        };
        (quote!(Async), invoke_fn)
    } else {
        let invoke_fn = quote! {
            fn __invoke(
                __chia_cx: ::chia::Context,
                __chia_args: ::std::vec::Vec<::chia::__private::ArgValue>,
            ) -> ::std::result::Result<::chia::__private::Value, ::chia::__private::TaskError> {
                #body
            }
        };
        (quote!(Sync), invoke_fn)
    };

    Ok(quote! {
        #item

        #setup_fn

        #cleanup_fn

        #(#cfgs)*
        #[doc = #mod_doc]
        #[allow(non_snake_case, dead_code, clippy::too_many_arguments, clippy::used_underscore_binding)]
        #mod_vis mod #fn_ident {
            #[allow(unused_imports)]
            use super::*;

            const __SPEC: ::chia::__private::FunctionSpec = ::chia::__private::FunctionSpec {
                name: #name,
                signature: #signature,
                sig_hash: #sig_hash,
                resources: &[#(#resources),*],
                num_cpus: #num_cpus,
                max_retries: #max_retries,
                retry_exceptions: #retry_exceptions,
                timeout: #timeout,
                arg_count: #arg_count,
                invoke: ::chia::__private::Invoke::#invoke_variant(__invoke),
                setup: #setup,
                cleanup: #cleanup,
            };

            /// What the cluster knows about this function.
            #item_vis static SPEC: ::chia::__private::FunctionSpec = __SPEC;

            ::chia::__private::inventory::submit! { __SPEC }

            /// Builds a call (set `.tag(..)` and other options, then `.remote(&cx)`).
            #item_vis fn call(#(#inputs),*) -> ::chia::Call<#value_ty> {
                ::chia::__private::new_call(&SPEC, ::std::vec![#(::chia::IntoArg::into_arg(#names)),*])
            }

            /// Submits the call; returns its `ObjectRef` at once.
            #item_vis fn remote(#cx: &::chia::Context, #(#inputs),*) -> ::chia::ObjectRef<#value_ty> {
                self::call(#(#names),*).remote(#cx)
            }

            /// Submits the call and blocks until its result is ready.
            #item_vis fn remote_blocking(
                #cx: &::chia::Context,
                #(#inputs),*
            ) -> ::std::result::Result<#value_ty, ::chia::Error> {
                self::call(#(#names),*).remote_blocking(#cx)
            }

            #[allow(deprecated)]
            #invoke_fn
        }
    })
}

#[cfg(test)]
mod tests {
    use super::{fixed_point, timeout_millis};

    #[test]
    fn timeouts_are_exact_milliseconds_and_more_than_zero() {
        assert_eq!(timeout_millis("3600"), Ok(3_600_000));
        assert_eq!(timeout_millis("2.5"), Ok(2_500));
        assert_eq!(timeout_millis("0.001"), Ok(1));
        for (text, names) in
            [("0", "more than 0"), ("0.0", "more than 0"), ("0.0001", "3 decimals"), ("1e3", "plain")]
        {
            let error = timeout_millis(text).expect_err(text);
            assert!(error.contains("`timeout_s`") && error.contains(names), "{text}: {error}");
        }
        assert!(timeout_millis("99999999999999999999").is_err());
    }

    #[test]
    fn fixed_point_is_exact() {
        assert_eq!(fixed_point("1"), Ok(10_000));
        assert_eq!(fixed_point("0.5"), Ok(5_000));
        assert_eq!(fixed_point("2.0001"), Ok(20_001));
        assert_eq!(fixed_point("3."), Ok(30_000));
        assert!(fixed_point("0.00001").is_err());
        assert!(fixed_point("1e3").is_err());
        assert!(fixed_point("99999999999999999999").is_err());
    }
}
