//! Parameter and return-type analysis shared by `#[chia::function]` and `#[chia::service]`, and
//! the decode → call → encode code both generate.

use proc_macro2::{Span, TokenStream as TokenStream2, TokenTree};
use quote::{ToTokens, format_ident, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{Error, FnArg, GenericArgument, Ident, Pat, PathArguments, ReturnType, Type};

/// What is being analysed, for error messages, and the type `Self` stands for (in an `impl`).
pub(crate) struct Subject<'a> {
    /// "remote function", "remote method", "service constructor".
    pub noun: &'static str,
    /// Where the context parameter must be: "the first parameter", "right after `self`".
    pub context_place: &'static str,
    /// Replaces `Self` in parameter and return types, which are also used outside the `impl`.
    pub self_ty: Option<&'a Type>,
}

/// How the function takes the worker's context, if it does.
pub(crate) enum ContextParam {
    None,
    ByRef,
    ByValue,
}

impl ContextParam {
    /// The leading argument passing the context held in `cx`, with its comma.
    pub(crate) fn arg(&self, cx: &Ident) -> TokenStream2 {
        match self {
            ContextParam::None => quote!(),
            ContextParam::ByRef => quote!(&#cx,),
            ContextParam::ByValue => quote!(#cx,),
        }
    }
}

/// A remote argument: its name and type (with `Self` replaced).
pub(crate) struct Param {
    pub ident: Ident,
    pub ty: Type,
}

/// The typed parameters of a remote callable: the optional leading context, then the arguments.
pub(crate) struct Params {
    pub context: ContextParam,
    pub params: Vec<Param>,
}

/// Analyses the typed parameters (the caller strips a leading receiver it accepts).
pub(crate) fn analyze_params<'a>(
    inputs: impl IntoIterator<Item = &'a FnArg>,
    subject: &Subject,
) -> syn::Result<Params> {
    let noun = subject.noun;
    let mut context = ContextParam::None;
    let mut params = Vec::new();
    for (index, arg) in inputs.into_iter().enumerate() {
        let arg = match arg {
            FnArg::Receiver(receiver) => {
                let message = if subject.self_ty.is_some() {
                    format!("a {noun} takes `self` only as its first parameter")
                } else {
                    format!("{noun}s cannot take `self`; use a free function")
                };
                return Err(Error::new_spanned(receiver, message));
            }
            FnArg::Typed(arg) => arg,
        };
        let ty = peel(&arg.ty);
        if let Some(by_ref) = context_kind(ty)? {
            if index != 0 {
                let place = subject.context_place;
                return Err(Error::new_spanned(ty, format!("the `Context` parameter must be {place}")));
            }
            context = if by_ref { ContextParam::ByRef } else { ContextParam::ByValue };
            continue;
        }
        let ident = match &*arg.pat {
            Pat::Ident(pat) if pat.by_ref.is_none() && pat.subpat.is_none() => pat.ident.clone(),
            pat => {
                return Err(Error::new_spanned(
                    pat,
                    format!("parameters of {noun}s must be plain identifiers such as `x: i64`"),
                ));
            }
        };
        check_owned(ty, noun, "parameter")?;
        params.push(Param { ident, ty: replace_self(ty, subject.self_ty) });
    }
    Ok(Params { context, params })
}

/// What a remote callable returns.
pub(crate) struct Output {
    /// The value type of a call: the return type, `()` when there is none, or the `Ok` type.
    pub value_ty: TokenStream2,
    pub returns_result: bool,
    pub returns_unit: bool,
    /// The whole return type for the signature text (`()` when there is none).
    pub text: String,
    /// Where type errors about the result are reported.
    pub span: Span,
}

pub(crate) fn analyze_output(output: &ReturnType, subject: &Subject) -> syn::Result<Output> {
    let noun = subject.noun;
    let span = here(output);
    Ok(match output {
        ReturnType::Default => Output {
            value_ty: quote!(()),
            returns_result: false,
            returns_unit: true,
            text: "()".into(),
            span,
        },
        ReturnType::Type(_, written) => {
            let ty = peel(written);
            check_owned(ty, noun, "return type")?;
            let text = compact(replace_self(written, subject.self_ty).to_token_stream());
            let whole = replace_self(ty, subject.self_ty);
            let returns_unit = matches!(&whole, Type::Tuple(tuple) if tuple.elems.is_empty());
            match result_ok_type(&whole)? {
                Some(ok) => {
                    check_owned(ok, noun, "`Ok` type")?;
                    Output { value_ty: ok.to_token_stream(), returns_result: true, returns_unit, text, span }
                }
                None => Output {
                    value_ty: whole.to_token_stream(),
                    returns_result: false,
                    returns_unit,
                    text,
                    span,
                },
            }
        }
    })
}

/// Type text without whitespace, as it goes into a signature.
pub(crate) fn compact(tokens: TokenStream2) -> String {
    tokens.to_string().split_whitespace().collect()
}

/// The hash the runtime compares signatures by: computed by `chia-core`, the one definition.
pub(crate) fn sig_hash(signature: &str) -> String {
    chia_core::signature_hash(signature)
}

/// `let __chia_argN: T = decode_arg(&__chia_cx, function, N, &args[N])?;` for each parameter,
/// and the locals. Every invoker names its context `__chia_cx`: service handles among the
/// arguments bind to it.
pub(crate) fn decode_args(params: &[Param], function: &str, args: &Ident) -> (Vec<Ident>, TokenStream2) {
    let locals: Vec<Ident> = (0..params.len()).map(|i| format_ident!("__chia_arg{i}")).collect();
    let decodes = params.iter().zip(&locals).enumerate().map(|(index, (Param { ty, .. }, local))| {
        quote_spanned! {here(ty)=>
            let #local: #ty = ::chia::__private::decode_arg(&__chia_cx, #function, #index, &#args[#index])?;
        }
    });
    let decodes = quote!(#(#decodes)*);
    (locals, decodes)
}

/// Runs `call` and encodes its value, or maps its `Err` to an application error.
pub(crate) fn finish(call: &TokenStream2, function: &str, output: &Output) -> TokenStream2 {
    if output.returns_result {
        quote_spanned! {output.span=>
            match #call {
                ::std::result::Result::Ok(__chia_value) => ::chia::__private::encode_result(#function, &__chia_value),
                ::std::result::Result::Err(__chia_error) => {
                    ::std::result::Result::Err(::chia::__private::application_error(#function, &__chia_error))
                }
            }
        }
    } else if output.returns_unit {
        quote!(#call; ::chia::__private::encode_result(#function, &()))
    } else {
        quote_spanned! {output.span=>
            let __chia_out = #call;
            ::chia::__private::encode_result(#function, &__chia_out)
        }
    }
}

/// A span that resolves names like the macro's own code but points at `tokens`, so type errors
/// in the generated code (e.g. a type that cannot be decoded) are reported there.
pub(crate) fn here(tokens: &impl Spanned) -> Span {
    Span::call_site().located_at(tokens.span())
}

/// Strips invisible groups (from `macro_rules!` expansions) and parentheses around a type.
pub(crate) fn peel(mut ty: &Type) -> &Type {
    loop {
        match ty {
            Type::Group(group) => ty = &group.elem,
            Type::Paren(paren) => ty = &paren.elem,
            _ => return ty,
        }
    }
}

/// `ty` with every `Self` replaced by `self_ty` (a path type), or `ty` itself outside an `impl`.
pub(crate) fn replace_self(ty: &Type, self_ty: Option<&Type>) -> Type {
    fn rewrite(tokens: TokenStream2, with: &TokenStream2) -> TokenStream2 {
        tokens
            .into_iter()
            .flat_map(|tree| match tree {
                TokenTree::Ident(ident) if ident == "Self" => with.clone(),
                TokenTree::Group(group) => {
                    let mut new = proc_macro2::Group::new(group.delimiter(), rewrite(group.stream(), with));
                    new.set_span(group.span());
                    TokenTree::Group(new).into_token_stream()
                }
                other => other.into_token_stream(),
            })
            .collect()
    }
    match self_ty {
        // The rewritten tokens are a valid type again: `Self` stands where a path may.
        Some(with) => {
            syn::parse2(rewrite(ty.to_token_stream(), &with.to_token_stream())).unwrap_or_else(|_| ty.clone())
        }
        None => ty.clone(),
    }
}

/// `Some(by_ref)` when `ty` is the runtime context: `Context`, `chia::Context` or a `&` to one.
pub(crate) fn context_kind(ty: &Type) -> syn::Result<Option<bool>> {
    let is_context = |ty: &Type| match peel(ty) {
        Type::Path(path) => {
            path.qself.is_none() && path.path.segments.last().is_some_and(|s| s.ident == "Context")
        }
        _ => false,
    };
    match ty {
        Type::Reference(reference) if is_context(&reference.elem) => {
            if reference.mutability.is_some() {
                return Err(Error::new_spanned(
                    ty,
                    "take the context as `&Context` or `Context`, not `&mut`",
                ));
            }
            Ok(Some(true))
        }
        ty if is_context(ty) => Ok(Some(false)),
        _ => Ok(None),
    }
}

/// Arguments and results cross processes, so they must be owned, nameable types.
pub(crate) fn check_owned(ty: &Type, noun: &str, what: &str) -> syn::Result<()> {
    match peel(ty) {
        Type::Reference(_) => Err(Error::new_spanned(
            ty,
            format!("a {noun}'s {what} cannot be a reference; use an owned type (e.g. `String` for `&str`)"),
        )),
        Type::ImplTrait(_) => Err(Error::new_spanned(
            ty,
            format!("a {noun}'s {what} cannot be `impl Trait`; name a concrete type"),
        )),
        _ => Ok(()),
    }
}

/// The `T` of a return type whose last path segment is `Result<T, ..>`.
pub(crate) fn result_ok_type(ty: &Type) -> syn::Result<Option<&Type>> {
    let Type::Path(path) = peel(ty) else { return Ok(None) };
    let Some(last) = path.path.segments.last().filter(|s| s.ident == "Result") else { return Ok(None) };
    if let PathArguments::AngleBracketed(args) = &last.arguments
        && let Some(GenericArgument::Type(ok)) = args.args.first()
    {
        return Ok(Some(peel(ok)));
    }
    Err(Error::new_spanned(ty, "write the result type as `Result<T, E>` so the macro can find `T`"))
}
